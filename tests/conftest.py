"""Session fixtures: tiny random-weight checkpoints, built once per test run."""

from __future__ import annotations

import os

import pytest
import torch

from ovis2.random_checkpoint import write_checkpoint
from tests.checkpoints import SHAPES, shape_config

if not torch.cuda.is_available():
    # Triton kernels run under its interpreter on CPU tensors (tests/test_triton_decode_attention.py). Set before
    # anything imports triton: the interpreter takes only the jit functions decorated after it is on.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _offline_hub():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def _float32_unless_asked():
    """`dtype="auto"` means bf16 on CPUs with AMX or AVX512-BF16, or AVX2 and a compiler: pinned to float32 here, so a test's numbers do
    not depend on the CI machine's CPU (tests/test_dtypes.py checks the rule itself; LiveServer passes --dtype)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("ovis2.dtypes.cpu_prefers_bf16", lambda: False)
        yield


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    """name -> directory, for every shape in tests.checkpoints.SHAPES."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        name: write_checkpoint(root / name, shape_config(name), seed=index)
        for index, name in enumerate(SHAPES)
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoints):
    """The default tiny checkpoint (stride 2, GQA, untied, 2 layers)."""
    return tiny_checkpoints["stride2_gqa_untied"]


@pytest.fixture(scope="session")
def videos():
    """Tiny test videos made with PyAV on first use (tests/videos.py)."""
    from tests.videos import VideoSet

    return VideoSet()
