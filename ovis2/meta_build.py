"""Building a module's skeleton on the meta device, its weights to be loaded or filled in after.

Without this, each layer's initializer runs on meta tensors through torch's reference ops, whose first use imports
torch._dynamo and with it triton: 1.2 s at every model load, and triton's nanobind prints ~27 "leaked" lines when
the process exits, which operators read as leaks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.nn.init as init

M = TypeVar("M", bound=torch.nn.Module)
INITIALIZERS = tuple(name for name in dir(init) if name.endswith("_") and not name.startswith("_"))


def build_on_meta(build: Callable[[], M]) -> M:
    """build() on the meta device, with torch.nn.init's initializers doing nothing meanwhile."""
    with torch.device("meta"), _initializers_skipped():
        return build()


@contextmanager
def _initializers_skipped() -> Iterator[None]:
    """Swaps torch.nn.init's functions for no-ops (process-wide: model loads run one at a time)."""
    saved = {name: getattr(init, name) for name in INITIALIZERS}
    for name in INITIALIZERS:
        setattr(init, name, _unchanged)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(init, name, function)


def _unchanged(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor
