"""Every knob of the engine in one dataclass: LLM(...)'s keywords and, field for field, the server's flags.

Each field's `help` is the flag's description and `check` its rule; `EngineArgs` and the server's settings both
validate with `field_problem`, so a rule and a default are written once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from functools import cache
from types import UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints

import torch

from ..compat import COMPAT_MODES, CompatMode
from ..dtypes import DtypeName, check_dtype
from ..errors import Ovis2Error
from ..image_layout import MAX_TILES_PER_IMAGE
from ..video_sampling import RECIPE_NUM_FRAMES
from .scalars import as_flag, is_integer, is_real


def _arg(default, help: str, check=None):
    return field(default=default, metadata={"help": help, "check": check})


def _at_least(low):
    return lambda v: None if v >= low else f"must be at least {low}"


def _between(low, high):
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def _optional(check):
    return lambda v: None if v is None else check(v)


def _one_of(choices):
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, not {v!r}"


def _dtype_rule(value) -> str | None:
    try:
        check_dtype(value)
    except Ovis2Error:
        return f"must be auto, bfloat16, float16, float32 (or those torch dtypes), not {value!r}"
    return None


def _device_rule(value) -> str | None:
    from ..weights import resolve_device

    try:
        resolve_device(value)
    except Ovis2Error as error:
        return f"is unusable: {error}"
    return None


@dataclass
class EngineArgs:
    model: str = _arg(
        "demo", "Checkpoint: a local directory, a hub id, or 'demo' (built-in tiny random model)."
    )
    compat: CompatMode = _arg(
        "ovis",
        "Image preprocessing: 'ovis' (original Ovis2) or 'transformers' (matches transformers' Ovis2).",
        _one_of(COMPAT_MODES),
    )
    dtype: DtypeName | torch.dtype = _arg(
        "auto",
        "Weights and activations dtype (auto: bfloat16 on CUDA, on CPUs with AMX or AVX512-BF16 and on AVX2 CPUs "
        "where the few-row bf16 kernel builds; else float32).",
        _dtype_rule,
    )
    device: str = _arg("auto", "Device: auto (cuda when available), cuda, cuda:N or cpu.", _device_rule)
    max_model_len: int | None = _arg(
        None,
        "Longest prompt + output in tokens (default: the model's, or what the KV cache holds if less).",
        _optional(_at_least(1)),
    )
    max_num_seqs: int = _arg(64, "Most sequences in one running batch.", _at_least(1))
    max_num_batched_tokens: int | None = _arg(
        None,
        "Most work the engine runs in one step, in tokens (image crops and prompt-logprob rows priced in "
        "tokens); it bounds how long running streams wait for a prefilling one (default: 4096 on CUDA, 2048 "
        "on CPU).",
        _optional(_at_least(1)),
    )
    block_size: int = _arg(16, "Tokens per KV cache block.", _at_least(1))
    kv_cache_memory: int | None = _arg(
        None,
        "Bytes for the KV cache (default: from --gpu-memory-utilization on "
        "GPU, --cpu-kv-cache-memory on CPU).",
        _optional(_at_least(1)),
    )
    gpu_memory_utilization: float = _arg(
        0.85,
        "Fraction of GPU memory the engine may use.",
        lambda v: None if 0.0 < v <= 1.0 else "must be in (0, 1]",
    )
    cpu_kv_cache_memory: int = _arg(256 * 1024 * 1024, "Bytes for the KV cache on CPU.", _at_least(1))
    max_images_per_request: int = _arg(
        8, "Most images in one request (video frames are counted apart).", _at_least(1)
    )
    max_video_frames: int = _arg(
        32,
        "Most frames sampled from one video; a request may ask 1 to this many (default: "
        "12, the Ovis2 recipe's, or this if lower).",
        _between(1, 1024),
    )
    max_video_frames_per_request: int = _arg(
        64,
        "Most video frames in one request, all its videos together (259 prompt tokens each).",
        _at_least(1),
    )
    max_tiles_per_image: int | None = _arg(
        None,
        "Most tiles per image (default: the compat's, 9 for ovis, 12 for "
        "transformers); requests may ask for fewer.",
        _optional(_between(1, MAX_TILES_PER_IMAGE)),
    )
    max_waiting_requests: int = _arg(
        1024, "Waiting-queue length past which requests are refused at once (503).", _at_least(1)
    )
    visual_cache_size: int = _arg(64, "Images whose visual embeddings stay cached (LRU).", _at_least(0))
    enable_prefix_caching: bool = _arg(
        True, "Reuse the KV of identical prompt prefixes (whole blocks, then leading tokens of one more)."
    )
    grammar_cache_size: int = _arg(
        128,
        "Compiled structured-output grammars kept for reuse (LRU; 0: compile every request's).",
        _at_least(0),
    )
    max_grammar_seconds_per_token: float = _arg(
        0.25,
        "Longest a request's structured-output matching may take for one token, its choices together, before the "
        "request fails (400): it runs on the engine's thread, and an ambiguous grammar's grows with every token.",
        lambda v: None if v > 0 else "must be above 0",
    )
    image_processor: Literal["pil", "fast"] = _arg(
        "pil",
        "Image preprocessing backend: 'pil' (bit-faithful resizes) or 'fast' "
        "(torch, about 3x faster, mean pixel difference under 0.01).",
        _one_of(("pil", "fast")),
    )
    enforce_eager: bool = _arg(
        False, "CUDA: run decode steps eagerly instead of replaying CUDA graphs (slower; for debugging)."
    )
    seed: int = _arg(0, "Engine seed for requests that give none.", _between(-(2**63), 2**64 - 1))

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):  # LLM(model=Path(...))
            self.model = os.fspath(self.model)
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
        for name, expected in _field_types().items():  # numpy and torch scalars as Python's
            setattr(self, name, _plain(getattr(self, name), expected))
        for item in fields(self):
            problem = field_problem(item.name, getattr(self, item.name))
            if problem is not None:
                raise Ovis2Error(f"{item.name} {problem}")
        problem = fields_problem(self.max_video_frames, self.max_video_frames_per_request)
        if problem is not None:
            raise Ovis2Error(problem)


def field_problem(name: str, value) -> str | None:
    """What is wrong with `value` for the field `name`, or None (a value of the wrong type: what type it needs)."""
    expected = _field_types().get(name)
    if expected is not None and not _has_type(value, expected):
        return (
            f"must be {' or '.join(t.__name__ for t in expected)}, not {type(value).__name__} {value!r:.40}"
        )
    check = EngineArgs.__dataclass_fields__[name].metadata.get("check")
    return None if check is None else check(value)


def fields_problem(max_video_frames: int, max_video_frames_per_request: int) -> str | None:
    """What is wrong across fields, or None: a video sampled at the default count must fit a request."""
    default_frames = min(RECIPE_NUM_FRAMES, max_video_frames)
    if max_video_frames_per_request < default_frames:
        return (
            f"max_video_frames_per_request ({max_video_frames_per_request}) is below the frames a video gives by "
            f"default ({default_frames}, the recipe's within max_video_frames): every video request naming no "
            "frame count would be refused"
        )
    return None


@cache
def _field_types() -> dict[str, tuple[type, ...]]:
    """The plain Python types each scalar field takes (None among them where it is optional)."""
    wanted = {}
    for name, hint in get_type_hints(EngineArgs).items():
        members = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
        plain = tuple(m for m in members if m in (int, float, bool, str, type(None)))
        if len(plain) == len(members):
            wanted[name] = plain
    return wanted


def _plain(value, expected: tuple[type, ...]):
    """`value` as the Python type the field takes where it is a number of another kind (numpy's, torch's, 0 or 1
    for a flag); otherwise as it is, for field_problem to judge."""
    if isinstance(value, bool | str | None):
        return value
    if bool in expected:
        return as_flag(value)
    if int in expected and is_integer(value):
        return int(value)
    if float in expected and is_real(value):
        return float(value)
    return value


def _has_type(value, expected: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in expected
    if isinstance(value, int) and float in expected:
        return True
    return isinstance(value, expected)
