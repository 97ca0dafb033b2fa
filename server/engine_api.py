"""The one place the server imports the engine's names (ovis2's public names, docs/CONTRACTS.md)."""

from __future__ import annotations

from ovis2 import (
    RECIPE_NUM_FRAMES,
    CompletionOutput,
    EngineDeadError,
    EngineInputs,
    EngineOverloadedError,
    ImageInput,
    Ovis2Error,
    RequestOutput,
    SamplingParams,
    StructuredOutputError,
    StructuredOutputsParams,
    TokenLogprob,
    VideoLimits,
    VideoProbe,
    decode_video_frames,
    frames_for_fps,
    probe_video,
    sample_timestamps,
)
from ovis2.tokenizer import DEFAULT_EOS_IDS, IMAGE_ATOM_ID, LONGEST_TOKEN_CHARS, VISUAL_INDICATOR_IDS

IMAGE_TOKEN_IDS = frozenset((IMAGE_ATOM_ID, *VISUAL_INDICATOR_IDS))


def build_engine(engine_kwargs: dict):
    """The real AsyncEngine; the model loads in its `start()`."""
    from ovis2 import AsyncEngine, EngineArgs

    return AsyncEngine(EngineArgs(**engine_kwargs))


__all__ = [
    "DEFAULT_EOS_IDS",
    "IMAGE_TOKEN_IDS",
    "LONGEST_TOKEN_CHARS",
    "RECIPE_NUM_FRAMES",
    "CompletionOutput",
    "EngineDeadError",
    "EngineInputs",
    "EngineOverloadedError",
    "ImageInput",
    "Ovis2Error",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputError",
    "StructuredOutputsParams",
    "TokenLogprob",
    "VideoLimits",
    "VideoProbe",
    "build_engine",
    "decode_video_frames",
    "frames_for_fps",
    "probe_video",
    "sample_timestamps",
]
