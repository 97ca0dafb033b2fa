"""The built-in demo model: a tiny random-weight Ovis2 checkpoint, and the random initialisation it uses.

The architecture is the real one (448px crops, 14px patches, hidden stride 2, Qwen2 with GQA) at tiny widths,
with the real tokenizer, so every code path runs offline. The weights are random: the text is nonsense.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .configuration import Ovis2Config, Ovis2TextConfig, Ovis2VisionConfig
from .meta_build import build_on_meta
from .tokenizer import CHAT_TEMPLATE, build_tokenizer

DEMO_FORMAT_VERSION = 2
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tiny_config(text: dict | None = None, vision: dict | None = None, **top) -> Ovis2Config:
    text_values = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=151936,
    )
    vision_values = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64 + 5,
        hidden_stride=2,
    )
    text_values.update(text or {})
    vision_values.update(vision or {})
    top.setdefault("tie_word_embeddings", False)
    return Ovis2Config(Ovis2TextConfig(**text_values), Ovis2VisionConfig(**vision_values), **top)


def random_init_(model: nn.Module, seed: int, layer_gain: float = 1.0) -> None:
    """Deterministic weights with large logit gaps, so greedy decoding is stable across implementations.

    A tied head echoes the input token unless the layers are strong: give tied models layer_gain ~3."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        value = _random_like(name, param, generator)
        if param.dim() == 2 and not any(word in name for word in ("embed", "table", "lm_head")):
            value = value * layer_gain
        param.data.copy_(value)


def _random_like(name: str, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(param.shape, generator=generator)
    if "norm" in name and name.endswith("weight"):
        return 1.0 + 0.2 * noise
    if name.endswith("bias"):
        return 0.1 * noise
    if param.dim() == 2 and ("embed" in name or "table" in name):
        return noise
    fan_in = param[0].numel() if param.dim() > 1 else param.numel()
    return noise / fan_in**0.5


def build_random_model(
    model_class, config: Ovis2Config, device: str = "cpu", seed: int = 0, layer_gain: float = 1.0
):
    """A model_class with `random_init_` weights, built on the meta device and filled in place on `device` (no
    default initialisation to throw away: the 2B shapes take seconds otherwise)."""
    model = build_on_meta(lambda: model_class(config)).to_empty(device=device)
    random_init_(model, seed, layer_gain)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def default_layer_gain(config: Ovis2Config) -> float:
    return 3.0 if config.tie_word_embeddings else 1.0


def write_processor_files(directory: Path) -> None:
    build_tokenizer().save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    preprocessor = {
        "image_processor_type": "Ovis2ImageProcessor",
        "processor_class": "Ovis2Processor",
        "crop_to_patches": True,
        "min_patches": 1,
        "max_patches": 12,
        "use_covering_area_grid": True,
        "size": {"height": 448, "width": 448},
        "resample": 3,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": True,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    processor = {"processor_class": "Ovis2Processor", "image_seq_length": 256}
    (directory / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def cache_root() -> Path:
    root = (
        os.environ.get("OVIS2_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ovis2-serve"
    )
    return Path(root)


def demo_files(model_class: type | None = None) -> Path:
    """The demo checkpoint's folder, written once per format version and reused (no network needed).

    The processor files are written on first use; the random weights once a model class asks for them (so this
    module never imports the model, which itself resolves "demo" through ovis2.checkpoint)."""
    config = tiny_config()
    tag = hashlib.sha256(json.dumps([DEMO_FORMAT_VERSION, config.to_dict()]).encode()).hexdigest()[:12]
    target = cache_root() / f"demo-{tag}"
    _write_once(target, "processor_config.json", write_processor_files)
    if model_class is not None:
        layer_gain = default_layer_gain(config)
        _write_once(
            target,
            "model.safetensors",
            lambda d: build_random_model(model_class, config, layer_gain=layer_gain).save_pretrained(d),
        )
    return target


def _write_once(target: Path, marker: str, write) -> None:
    """Files that `write(folder)` makes, moved into target with `marker` last; a concurrent writer's copy is the same."""
    if (target / marker).is_file():
        return
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        write(staging)
        for file in sorted(staging.iterdir(), key=lambda path: path.name == marker):
            os.replace(file, target / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
