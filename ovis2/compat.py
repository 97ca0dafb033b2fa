"""The two preprocessing behaviours a model can be served with, named once."""

from __future__ import annotations

from typing import Literal, get_args

from .errors import Ovis2Error

CompatMode = Literal["ovis", "transformers"]  # the original Ovis2 recipe | transformers' Ovis2
COMPAT_MODES: tuple[str, ...] = get_args(CompatMode)


def check_compat(compat: str) -> str:
    if compat not in COMPAT_MODES:
        raise Ovis2Error(f"compat must be one of {COMPAT_MODES}, not {compat!r}")
    return compat
