"""Every server flag in one pydantic-settings model: `--flag-name` on the command line, `OVIS2_FLAG_NAME` in
the environment. Built by the CLI or a test, never at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OVIS2_", extra="forbid", validate_default=True)

    # The model and the engine.
    model: str = Field("demo", description="Checkpoint: a local directory, a hub id, or 'demo' (built-in tiny model).")
    served_model_name: str | None = Field(None, description="Model id clients send and /v1/models lists (default: --model).")
    device: str = Field("auto", description="Device: auto (cuda when available), cuda, cuda:N or cpu.")
    dtype: Literal["auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Weights and activations dtype (auto: bfloat16 on CUDA, float32 on CPU).")
    compat: Literal["ovis", "transformers"] = Field(
        "ovis", description="Image preprocessing: 'ovis' (original Ovis2) or 'transformers' (matches transformers' Ovis2).")
    max_model_len: int | None = Field(None, ge=1, description="Longest prompt + output in tokens (default: the model's).")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences in one running batch.")
    max_num_batched_tokens: int = Field(4096, ge=1, description="Most tokens the engine runs in one step.")
    block_size: int = Field(16, ge=1, description="Tokens per KV cache block.")
    kv_cache_memory: int | None = Field(None, ge=1, description="Bytes for the KV cache (default: from --gpu-memory-utilization on GPU, 256 MiB on CPU).")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0, description="Fraction of GPU memory the engine may use.")
    max_waiting_requests: int = Field(1024, ge=1, description="Waiting-queue length past which requests get 503 at once.")
    visual_cache_size: int = Field(64, ge=0, description="Images whose visual embeddings stay cached.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of identical prompt prefixes.")
    image_processor: Literal["pil", "fast"] = Field(
        "pil", description="Image preprocessing backend: 'pil' (bit-faithful resizes) or 'fast' (torch, about 3x faster, mean pixel difference under 0.01).")
    seed: int = Field(0, description="Engine seed for requests that give none.")
    enforce_eager: bool = Field(False, description="CUDA: run decode steps eagerly instead of replaying CUDA graphs (slower; for debugging).")

    # HTTP.
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for every interface).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    api_key: SecretStr | None = Field(None, description="When set, inference routes need 'Authorization: Bearer <key>'.")
    cors_origins: CommaList = Field(default_factory=list, description="Comma-separated origins allowed by CORS ('*' for any); none by default.")
    max_request_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest request body; bigger ones get 413.")
    shutdown_grace_seconds: float = Field(30.0, ge=0.0, description="On SIGTERM, how long in-flight requests may finish.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")
    stats_log_interval: float = Field(10.0, ge=0.0, description="Seconds between log lines with throughput, queue and KV cache use while busy (0: off).")

    # Images: limits.
    max_images_per_request: int = Field(8, ge=1, description="Most images in one request.")
    max_tiles_per_image: int | None = Field(None, ge=1, description="Most tiles per image (default: the compat's, 9 or 12); requests may ask for fewer.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest encoded image, fetched or base64.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest width x height, checked before decoding.")
    max_image_pixels_in_flight: int = Field(400_000_000, ge=1, description="Most decoded image pixels held at once across all requests (4 bytes each in Pillow); requests beyond it wait, one needing more alone gets 400.")

    # Images: where they may come from.
    media_connect_timeout: float = Field(3.0, gt=0.0, description="Seconds to connect to an image server.")
    media_fetch_timeout: float = Field(10.0, gt=0.0, description="Seconds for a whole image download, redirects included.")
    max_media_redirects: int = Field(3, ge=0, le=10, description="Redirects followed per image URL, each re-checked.")
    allowed_media_domains: CommaList = Field(default_factory=list, description="Comma-separated hosts image URLs may name ('*.example.com' for subdomains); any public host when empty.")
    allowed_media_networks: CommaList = Field(default_factory=list, description="Comma-separated IPs or CIDRs allowed although private, e.g. 127.0.0.1 or 10.0.0.0/8.")
    allow_private_media_addresses: bool = Field(False, description="Allow image URLs on private, loopback and link-local addresses (never cloud metadata).")
    allowed_local_media_path: Path | None = Field(None, description="Directory file:// image URLs may read from; file:// is refused when unset.")

    @field_validator("cors_origins", "allowed_media_domains", "allowed_media_networks", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @model_validator(mode="after")
    def _one_image_fits_the_pixel_budget(self) -> ServerSettings:
        if self.max_image_pixels_in_flight < self.max_image_pixels:
            raise ValueError(f"max_image_pixels_in_flight ({self.max_image_pixels_in_flight}) is below max_image_pixels "
                             f"({self.max_image_pixels}): an image of the allowed size could never be decoded")  # fmt: skip
        return self

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model

    def engine_args_kwargs(self) -> dict:
        """The EngineArgs fields these settings fill in."""
        names = (
            "model", "compat", "dtype", "device", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
            "block_size", "kv_cache_memory", "gpu_memory_utilization", "max_images_per_request",
            "max_tiles_per_image", "max_waiting_requests", "visual_cache_size", "enable_prefix_caching",
            "image_processor", "seed", "enforce_eager",
        )  # fmt: skip
        return {name: getattr(self, name) for name in names}
