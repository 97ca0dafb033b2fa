"""What the routes share: settings, the engine, metrics, the image and video loaders, and the in-flight count."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from .errors import APIError
from .media import ImageLoader
from .media.byte_budget import MediaBytesBudget
from .media.video import VideoLoader
from .metrics import ServerMetrics
from .settings import ServerSettings


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: ServerMetrics
    images: ImageLoader
    videos: VideoLoader = field(default_factory=VideoLoader)
    media_bytes: MediaBytesBudget = field(default_factory=MediaBytesBudget)  # encoded media held at once
    engine: Any = None  # an AsyncEngine (docs/CONTRACTS.md); set by the lifespan
    num_in_flight: int = 0
    listening_on: str | None = None  # the runner's addresses, for the start-up log line (server/__main__.py)
    exit_requested: Callable[[], bool] | None = None  # the runner's "told to stop" flag (server/__main__.py)
    started_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_id(self) -> str:
        return self.settings.model_id

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    @property
    def max_tiles_per_image(self) -> int | None:
        """The most tiles a request may ask for per image: --max-tiles-per-image, else what the image processor
        gives by default (the compat's: 9 for ovis, 12 or the checkpoint's for transformers). None when the engine's
        processor has no `image_processor.resolve_patches()` to ask; the processor alone checks then."""
        if self.settings.max_tiles_per_image is not None:
            return self.settings.max_tiles_per_image
        resolve = getattr(getattr(self.engine.processor, "image_processor", None), "resolve_patches", None)
        return int(resolve()[0]) if resolve is not None else None

    @property
    def vocab_size(self) -> int:
        return len(self.engine.tokenizer)

    def check_model(self, model: str | None) -> None:
        """Clients must name the served model (or leave it out)."""
        if model is not None and model not in (self.model_id, self.settings.model):
            raise APIError(
                f"the model '{model}' does not exist; this server serves '{self.model_id}'",
                404,
                param="model",
                code="model_not_found",
            )

    def request_started(self) -> None:
        self.num_in_flight += 1

    def request_finished(self) -> None:
        self.num_in_flight -= 1


def get_state(request: Request) -> ServerState:
    return request.app.state.server
