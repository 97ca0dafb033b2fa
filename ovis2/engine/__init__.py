"""Serving-oriented inference: continuous batching over a paged KV cache, usable without HTTP.

Names load lazily, so importing the package has no side effects.
"""

from ..lazy import lazy_getattr

_EXPORTS = {
    "EngineArgs": "engine_args",
    "EngineInputs": "inputs",
    "ImageInput": "inputs",
    "SamplingParams": "sampling_params",
    "StructuredOutputsParams": "structured.params",
    "RequestOutput": "outputs",
    "CompletionOutput": "outputs",
    "TokenLogprob": "outputs",
    "RequestMetrics": "outputs",
    "LLMEngine": "llm_engine",
    "EngineStats": "engine_stats",
    "EngineCore": "core",
    "AsyncEngine": "async_engine",
    "EngineDeadError": "async_engine",
    "EngineOverloadedError": "async_engine",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
