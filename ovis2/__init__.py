"""Ovis2 vision-language models: the model, its processors, and a continuous-batching engine.

Names load lazily, so `import ovis2` stays cheap and has no side effects.
"""

from .lazy import lazy_getattr

_EXPORTS = {
    "Ovis2Error": "errors",
    "Ovis2Config": "configuration",
    "Ovis2VisionConfig": "configuration",
    "Ovis2TextConfig": "configuration",
    "config_for_size": "configuration",
    "Ovis2VisionModel": "modeling",
    "Ovis2Model": "modeling",
    "Ovis2ForConditionalGeneration": "modeling",
    "Ovis2ImageProcessor": "image_processing",
    "Ovis2ImageProcessorFast": "image_processing_fast",
    "Ovis2Processor": "processing",
    "build_tokenizer": "tokenizer",
    "demo_checkpoint_dir": "random_checkpoint",
    "write_checkpoint": "random_checkpoint",
    "tiny_config": "demo",
    "resolve_checkpoint": "checkpoint",
    "infer_device": "weights",
    "LLM": "llm",
    "SamplingParams": "engine.sampling_params",
    "StructuredOutputsParams": "engine.structured.params",
    "StructuredOutputError": "errors",
    "EngineArgs": "engine.engine_args",
    "EngineInputs": "inputs",
    "ImageInput": "inputs",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "TokenLogprob": "engine.outputs",
    "RequestMetrics": "engine.outputs",
    "EngineStats": "engine.engine_stats",
    "AsyncEngine": "engine.async_engine",
    "LLMEngine": "engine.llm_engine",
    "EngineDeadError": "engine.async_engine",
    "EngineOverloadedError": "engine.async_engine",
    "VideoLimits": "video_probe",
    "VideoProbe": "video_probe",
    "SampledVideo": "video",
    "load_video": "video",
    "probe_video": "video_probe",
    "decode_video_frames": "video",
    "RECIPE_NUM_FRAMES": "video_sampling",
    "sample_indices": "video_sampling",
    "sample_timestamps": "video_sampling",
    "frames_for_fps": "video_sampling",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
