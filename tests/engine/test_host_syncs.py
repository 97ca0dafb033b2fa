"""The model part of an engine step never makes the host wait for the device.

On a GPU each such wait (a boolean-mask index, `int(tensor)`, `nonzero`) stalls the CPU until the queued
kernels finish, per layer where it sits in attention. The issue allows the one sampling needs. On CPU
there is no device to wait for, so this records the operations that would wait, under a dispatch mode.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ovis2.engine.sampling_params import SamplingParams
from tests.engine.prompts import chat_prompt, random_image, text_ids

aten = torch.ops.aten
WAITING_OPS = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten.unique_consecutive,
    aten._unique2,
}
INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class HostWaitRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in WAITING_OPS or (packet in INDEX_OPS and _has_bool_index(args[1])):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _has_bool_index(indices) -> bool:
    return any(index is not None and index.dtype == torch.bool for index in indices)


def test_recorder_sees_the_waits_it_looks_for():
    x = torch.arange(6.0)
    with HostWaitRecorder() as recorder:
        x[x > 2] = 0.0
        _ = x[torch.tensor([True, False] * 3)]
        int(x.sum())
    assert len(recorder.ops) == 3, recorder.ops


@pytest.mark.parametrize("fixed_decode", [False, True], ids=["eager", "fixed-shape decode"])
def test_engine_steps_run_the_model_without_host_waits(make_engine, fixed_decode):
    engine = make_engine(max_num_batched_tokens=300)  # the image prompt prefills in chunks
    if fixed_decode:  # what CUDA graphs capture: a wait there would fail the capture
        engine.core.runner.enable_decode_graphs(engine.max_model_len, capture=False)
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
    engine.add_request("image", chat_prompt(text_ids(1, 7), [random_image(1, (1, 2))]), params)
    engine.add_request("text", chat_prompt(text_ids(2, 11)), params)
    runner = engine.core.runner
    recorded: dict[str, list[list[str]]] = {"execute": [], "prepare": []}
    for owner, name in ((runner, "execute"), (runner.visual, "prepare")):
        setattr(owner, name, _recording(getattr(owner, name), recorded[name]))
    while engine.has_unfinished_requests:
        engine.step()
    assert len(recorded["execute"]) > 4  # chunked prefill with an image, then decodes
    assert engine.core.runner.visual.num_encoded_images == 1
    assert bool(engine.core.runner.decode_graphs and engine.core.runner.decode_graphs.buckets) == fixed_decode
    assert all(ops == [] for calls in recorded.values() for ops in calls), recorded


def _recording(method, calls: list[list[str]]):
    def wrapper(*args):
        with HostWaitRecorder() as recorder:
            result = method(*args)
        calls.append(recorder.ops)
        return result

    return wrapper


def test_fixed_decode_forward_builds_no_tensor_from_python_data(make_engine):
    """Under CUDA graph capture a tensor made from a Python list is a copy from pageable host memory, which
    capture forbids (and a replay would not repeat): the captured forward must only compute on device tensors."""
    from ovis2.engine import decode_graphs

    engine = make_engine()
    engine.core.runner.enable_decode_graphs(engine.max_model_len, capture=False)
    made: list[str] = []
    forward = decode_graphs.FixedDecode.forward

    class TensorFromData(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is aten.lift_fresh:
                made.append(str(func))
            return func(*args, **(kwargs or {}))

    def recording_forward(self):
        with TensorFromData(), HostWaitRecorder() as waits:
            hidden = forward(self)
        made.extend(waits.ops)
        return hidden

    decode_graphs.FixedDecode.forward = recording_forward
    try:
        params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
        engine.add_request("text", chat_prompt(text_ids(2, 11)), params)
        while engine.has_unfinished_requests:
            engine.step()
    finally:
        decode_graphs.FixedDecode.forward = forward
    assert engine.core.runner.decode_graphs.buckets and made == []
