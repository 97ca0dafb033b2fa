"""Random-weight Ovis2 models and checkpoints of any shape, for tests and benchmarks (ovis2.demo's recipe)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import DEMO, resolve_checkpoint
from .configuration import Ovis2Config
from .demo import build_random_model, default_layer_gain, tiny_config, write_processor_files
from .modeling import Ovis2ForConditionalGeneration


def random_model(config: Ovis2Config, device: str = "cpu", seed: int = 0, layer_gain: float = 1.0):
    return build_random_model(Ovis2ForConditionalGeneration, config, device, seed, layer_gain)


def write_checkpoint(
    directory: str | Path, config: Ovis2Config | None = None, seed: int = 0, layer_gain: float | None = None
) -> Path:
    """Random weights (-hf layout), config, tokenizer, chat template and preprocessor config."""
    directory = Path(directory)
    config = config or tiny_config()
    layer_gain = default_layer_gain(config) if layer_gain is None else layer_gain
    random_model(config, seed=seed, layer_gain=layer_gain).save_pretrained(directory)
    write_processor_files(directory)
    return directory


def demo_checkpoint_dir() -> Path:
    """The whole demo checkpoint (weights included): what `--model demo` serves."""
    return resolve_checkpoint(DEMO, model_class=Ovis2ForConditionalGeneration)
