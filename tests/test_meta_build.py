"""Models are built on the meta device without running torch's initializers (ovis2/meta_build.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.init as init

from ovis2.meta_build import INITIALIZERS, build_on_meta


def test_initializers_do_nothing_meanwhile_and_come_back_after():
    before = {name: getattr(init, name) for name in INITIALIZERS}
    calls = []

    def build():
        calls.append(init.normal_(torch.empty(2)))
        raise RuntimeError("a failed build")

    with pytest.raises(RuntimeError, match="a failed build"):
        build_on_meta(build)
    assert calls and calls[0].is_meta
    assert {name: getattr(init, name) for name in INITIALIZERS} == before
    layer = build_on_meta(lambda: torch.nn.Linear(3, 4))
    assert layer.weight.is_meta and layer.weight.shape == (4, 3)


def test_loading_a_model_imports_neither_dynamo_nor_triton(tiny_checkpoint):
    """Initializers on meta tensors imported torch._dynamo and triton (1.2 s a load; nanobind's "leaked" lines at
    every exit)."""
    script = (
        "import sys\n"
        "from ovis2.modeling import Ovis2ForConditionalGeneration\n"
        f"Ovis2ForConditionalGeneration.from_pretrained({str(tiny_checkpoint)!r}, dtype='float32', device='cpu')\n"
        "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
    assert "leaked" not in done.stderr
