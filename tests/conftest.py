"""Session fixtures: tiny random-weight checkpoints, built once per test run."""

from __future__ import annotations

import os

import pytest

from ovis2.random_checkpoint import write_checkpoint
from tests.checkpoints import SHAPES, shape_config


@pytest.fixture(scope="session", autouse=True)
def _offline_hub():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


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
