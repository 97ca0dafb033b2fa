"""Every knob of the engine in one dataclass, shared by LLM(...) and the server's flags."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Ovis2Error


@dataclass
class EngineArgs:
    model: str = "demo"  # local dir, hub id, or "demo" for the built-in random-weight checkpoint
    compat: str = "ovis"  # "ovis" (original preprocessing + no final vision norm) | "transformers"
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto: cuda if available else cpu
    max_model_len: int | None = None  # None: the model's max positions
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: from gpu_memory_utilization / CPU default
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_memory: int = 256 * 1024 * 1024
    max_images_per_request: int = 8
    max_tiles_per_image: int | None = None  # None: the compat's default (9 original, 12 transformers)
    max_waiting_requests: int = 1024
    visual_cache_size: int = 64  # images whose visual embeddings stay cached (LRU)
    enable_prefix_caching: bool = True
    image_processor: str = "pil"  # "pil" (bit-faithful resizes) | "fast" (torch resizes, ~3x faster)
    enforce_eager: bool = False  # CUDA: run decode steps eagerly instead of replaying CUDA graphs
    seed: int = 0

    def __post_init__(self) -> None:
        if self.compat not in ("ovis", "transformers"):
            raise Ovis2Error(f"compat must be 'ovis' or 'transformers', not {self.compat!r}")
        if self.image_processor not in ("pil", "fast"):
            raise Ovis2Error(f"image_processor must be 'pil' or 'fast', not {self.image_processor!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32"):
            raise Ovis2Error(f"dtype must be auto, bfloat16, float16 or float32, not {self.dtype!r}")
        positive = ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_images_per_request")
        for name in positive:
            if getattr(self, name) < 1:
                raise Ovis2Error(f"{name} must be at least 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise Ovis2Error("gpu_memory_utilization must be in (0, 1]")
