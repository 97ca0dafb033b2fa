"""Every server flag in one pydantic-settings model: `--flag-name` on the command line, `OVIS2_FLAG_NAME` in
the environment. The engine's flags are EngineArgs' fields (name, type, default, help and rule written there
once); the HTTP and media flags are the server's own. Built by the CLI or a test, never at import time."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ovis2 import EngineArgs
from ovis2.engine.engine_args import field_problem, fields_problem

CommaList = Annotated[list[str], NoDecode]
ENGINE_FIELDS = tuple(item.name for item in dataclasses.fields(EngineArgs))


class _SettingsBase(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OVIS2_", extra="forbid", validate_default=True)


def _flag_type(hint):
    """A flag's type: EngineArgs' own, less the torch.dtype that only Python callers can pass."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kept = [a for a in args if getattr(a, "__module__", "") != "torch"]
        return kept[0] if len(kept) == 1 else typing.Union[tuple(kept)]  # noqa: UP007
    return hint


def _engine_rule(cls, value, info: ValidationInfo):
    problem = field_problem(info.field_name, value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _engine_settings() -> type[BaseSettings]:
    hints = typing.get_type_hints(EngineArgs)
    flags = {
        item.name: (_flag_type(hints[item.name]), Field(item.default, description=item.metadata["help"]))
        for item in dataclasses.fields(EngineArgs)
    }
    rules = {"_engine_rules": field_validator(*ENGINE_FIELDS)(_engine_rule)}
    return create_model("EngineSettings", __base__=_SettingsBase, __validators__=rules, **flags)


EngineSettings = _engine_settings()


class ServerSettings(EngineSettings):
    served_model_name: str | None = Field(
        None, description="Model id clients send and /v1/models lists (default: --model)."
    )

    # HTTP.
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for every interface).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    api_key: SecretStr | None = Field(
        None, description="When set, inference routes need 'Authorization: Bearer <key>'."
    )
    cors_origins: CommaList = Field(
        default_factory=list,
        description="Comma-separated origins allowed by CORS ('*' for any); none by default.",
    )
    max_request_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Largest request body; bigger ones get 413."
    )
    shutdown_grace_seconds: float = Field(
        30.0, ge=0.0, description="On SIGTERM, how long in-flight requests may finish."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level."
    )
    stats_log_interval: float = Field(
        10.0,
        ge=0.0,
        description="Seconds between log lines with throughput, queue and KV cache use while busy (0: off).",
    )
    malloc_arena_max: int = Field(
        2,
        ge=0,
        le=1024,
        description="Heaps glibc's malloc may keep (0: glibc's default, 8 per core; a MALLOC_ARENA_MAX in the environment wins); fewer keep the RSS steady between bursts.",
    )

    # Images: limits (with --max-images-per-request and --max-tiles-per-image).
    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest encoded image, fetched or base64."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest width x height, checked before decoding."
    )
    max_image_pixels_in_flight: int = Field(
        400_000_000,
        ge=1,
        description="Most decoded image pixels held at once across all requests (4 bytes each in Pillow); requests beyond it wait, one needing more alone gets 400.",
    )

    max_media_bytes_in_flight: int = Field(
        1024 * 1024 * 1024,
        ge=1,
        description="Most encoded image and video bytes (fetched or base64) held at once across all requests, until each request's media are decoded; a request that would pass it gets 503 (retry).",
    )

    # Videos: limits (with --max-video-frames and --max-video-frames-per-request, which the engine checks too).
    max_videos_per_request: int = Field(4, ge=1, description="Most video parts in one request.")
    max_video_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="Largest encoded video, fetched or base64 (the body cap limits base64 ones too).",
    )
    max_video_seconds: float = Field(
        600.0, gt=0.0, description="Longest video, by its frames' timestamps and by what its header declares."
    )
    max_video_stream_frames: int = Field(
        36_000,
        ge=1,
        description="Most frames a video file may hold (its packets are read, not decoded, to time them).",
    )
    max_video_frame_pixels: int = Field(
        3840 * 2160,
        ge=1,
        description="Largest video frame (width x height), checked from the header; the sampled frames count against --max-image-pixels-in-flight.",
    )
    video_decode_timeout: float = Field(
        20.0,
        gt=0.0,
        description="Seconds for reading a video's packets, and again for decoding its sampled frames.",
    )
    video_decode_workers: int = Field(
        2,
        ge=1,
        le=64,
        description="Threads that read and decode videos, a pool of their own: more videos wait their turn.",
    )
    video_fetch_timeout: float = Field(
        30.0, gt=0.0, description="Seconds for a whole video download, redirects included."
    )

    # Images and videos: where they may come from.
    media_connect_timeout: float = Field(
        3.0, gt=0.0, description="Seconds to connect to an image or video server."
    )
    media_fetch_timeout: float = Field(
        10.0, gt=0.0, description="Seconds for a whole image download, redirects included."
    )
    max_media_redirects: int = Field(
        3, ge=0, le=10, description="Redirects followed per image or video URL, each re-checked."
    )
    allowed_media_domains: CommaList = Field(
        default_factory=list,
        description="Comma-separated hosts image and video URLs may name ('*.example.com' for subdomains); any public host when empty.",
    )
    allowed_media_networks: CommaList = Field(
        default_factory=list,
        description="Comma-separated IPs or CIDRs allowed although private, e.g. 127.0.0.1 or 10.0.0.0/8.",
    )
    allow_private_media_addresses: bool = Field(
        False,
        description="Allow image and video URLs on private, loopback and link-local addresses (never cloud metadata).",
    )
    allowed_local_media_path: Path | None = Field(
        None,
        description="Directory file:// image and video URLs may read from; file:// is refused when unset.",
    )

    @field_validator("cors_origins", "allowed_media_domains", "allowed_media_networks", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("served_model_name")
    @classmethod
    def _a_blank_name_is_unset(cls, value: str | None) -> str | None:
        return value if value is None or value.strip() else None  # OVIS2_SERVED_MODEL_NAME= : --model's name

    @field_validator("api_key")
    @classmethod
    def _a_key_is_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError(
                "is empty: leave it unset to serve without a key (an empty key would turn it off)"
            )
        return value

    @model_validator(mode="after")
    def _a_video_fits_a_request(self) -> ServerSettings:
        problem = fields_problem(self.max_video_frames, self.max_video_frames_per_request)
        if problem is not None:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _one_image_fits_the_pixel_budget(self) -> ServerSettings:
        if self.max_image_pixels_in_flight < self.max_image_pixels:
            raise ValueError(
                f"max_image_pixels_in_flight ({self.max_image_pixels_in_flight}) is below max_image_pixels "
                f"({self.max_image_pixels}): an image of the allowed size could never be decoded"
            )
        return self

    @model_validator(mode="after")
    def _one_part_fits_the_byte_budget(self) -> ServerSettings:
        largest = max(self.max_image_bytes, self.max_video_bytes)
        if self.max_media_bytes_in_flight < largest:
            raise ValueError(
                f"max_media_bytes_in_flight ({self.max_media_bytes_in_flight}) is below the largest image or video "
                f"allowed ({largest} bytes): such a part could never be fetched"
            )
        return self

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model

    def engine_args_kwargs(self) -> dict:
        """The EngineArgs these settings make, as keywords."""
        return {name: getattr(self, name) for name in ENGINE_FIELDS}
