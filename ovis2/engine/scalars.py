"""What counts as an integer, a number or a flag in the Python API's arguments (SamplingParams, EngineArgs, prompts):
Python's own, numpy's and torch's alike; a bool is a flag, never a count."""

from __future__ import annotations

import numbers

import numpy as np


def is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def as_flag(value):
    """Python's bool for numpy's bool or an integer 0 or 1; anything else as it is (for the caller to refuse)."""
    if isinstance(value, np.bool_) or is_integer(value) and value in (0, 1):
        return bool(value)
    return value
