"""The one place the server imports the engine's names (docs/CONTRACTS.md), so moving them to `ovis2`'s
public names is a one-file change."""

from __future__ import annotations

from ovis2.engine.inputs import EngineInputs, ImageInput
from ovis2.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from ovis2.engine.sampling_params import MAX_N, MAX_TOP_LOGPROBS, SamplingParams
from ovis2.errors import Ovis2Error
from ovis2.tokenizer import IMAGE_ATOM_ID, VISUAL_INDICATOR_IDS

try:  # the engine's own error types, once ovis2/engine/async_engine.py exists
    from ovis2.engine.async_engine import EngineDeadError, EngineOverloadedError
except ImportError:  # pragma: no cover - until the engine lands

    class EngineDeadError(RuntimeError):  # type: ignore[no-redef]
        """The engine loop has stopped."""

    class EngineOverloadedError(RuntimeError):  # type: ignore[no-redef]
        """The engine's waiting queue is full."""


IMAGE_TOKEN_IDS = frozenset((IMAGE_ATOM_ID, *VISUAL_INDICATOR_IDS))


def build_engine(engine_kwargs: dict):
    """The real AsyncEngine, imported late so that tests with a fake engine never load the model code."""
    from ovis2.engine.async_engine import AsyncEngine
    from ovis2.engine.engine_args import EngineArgs

    return AsyncEngine(EngineArgs(**engine_kwargs))


__all__ = [
    "MAX_N", "MAX_TOP_LOGPROBS", "IMAGE_TOKEN_IDS", "CompletionOutput", "EngineDeadError", "EngineInputs",
    "EngineOverloadedError", "ImageInput", "Ovis2Error", "RequestOutput", "SamplingParams", "TokenLogprob",
    "build_engine",
]  # fmt: skip
