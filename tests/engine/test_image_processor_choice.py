"""`image_processor` picks the preprocessing backend of the engine's processor."""

from __future__ import annotations

import pytest

from ovis2.engine.async_engine import AsyncEngine
from ovis2.engine.engine_args import EngineArgs
from ovis2.errors import Ovis2Error
from ovis2.image_processing import Ovis2ImageProcessor
from ovis2.image_processing_fast import Ovis2ImageProcessorFast


@pytest.mark.parametrize(
    "choice, expected", [("pil", Ovis2ImageProcessor), ("fast", Ovis2ImageProcessorFast)]
)
def test_engine_processor_uses_the_chosen_backend(engine_checkpoint, choice, expected):
    engine = AsyncEngine(EngineArgs(model=str(engine_checkpoint), device="cpu", image_processor=choice))
    assert type(engine.processor.image_processor) is expected


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(Ovis2Error, match="image_processor"):
        EngineArgs(image_processor="opencv")
