"""Serving-oriented inference: continuous batching over a paged KV cache, usable without HTTP.

Names load lazily, so importing the package has no side effects.
"""

from importlib import import_module

_EXPORTS = {
    "EngineArgs": "engine_args",
    "EngineInputs": "inputs",
    "ImageInput": "inputs",
    "SamplingParams": "sampling_params",
    "RequestOutput": "outputs",
    "CompletionOutput": "outputs",
    "TokenLogprob": "outputs",
    "RequestMetrics": "outputs",
    "LLMEngine": "llm_engine",
    "EngineStats": "llm_engine",
    "AsyncEngine": "async_engine",
    "EngineDeadError": "async_engine",
    "EngineOverloadedError": "async_engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ovis2.engine' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
