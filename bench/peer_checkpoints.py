"""Random-weight checkpoints of the exact Ovis2 shapes, bf16, in both layouts, built once into a cache folder.

    <cache>/checkpoints/Ovis2-1B-random-<tag>/hf     this project and `transformers serve`
    <cache>/checkpoints/Ovis2-1B-random-<tag>/aidc   the original AIDC layout, for vLLM

Speed does not depend on weight values, so random weights of the right shapes measure the real cost. Each layout
is written into a staging folder and renamed into place, so an interrupted build never leaves a half checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1
DTYPE = "bfloat16"


def peers_cache_root() -> Path:
    """OVIS2_PEERS_CACHE, else ~/.cache/ovis2-serve/peers (XDG_CACHE_HOME respected): outside the repository."""
    if os.environ.get("OVIS2_PEERS_CACHE"):
        return Path(os.environ["OVIS2_PEERS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ovis2-serve" / "peers"


@dataclass(frozen=True)
class CheckpointPair:
    size: str
    hf: Path
    aidc: Path


def checkpoint_tag(config_dict: dict, seed: int) -> str:
    payload = json.dumps([FORMAT_VERSION, DTYPE, seed, config_dict], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def checkpoint_paths(size: str, root: Path | None = None, seed: int = 0) -> CheckpointPair:
    from ovis2.configuration import config_for_size

    base = (root or peers_cache_root()) / "checkpoints"
    folder = base / f"Ovis2-{size}-random-{checkpoint_tag(config_for_size(size).to_dict(), seed)}"
    return CheckpointPair(size, folder / "hf", folder / "aidc")


def _build_into(target: Path, write) -> Path:
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-staging-", dir=target.parent))
    os.chmod(staging, 0o755)  # mkdtemp's folders are private; a checkpoint is not
    try:
        write(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_hf_checkpoint(directory: Path, size: str, seed: int = 0) -> Path:
    """-hf layout: random weights (ovis2.random_checkpoint's recipe) cast to bf16, processor files, a dtype field."""
    import torch

    from ovis2.configuration import config_for_size
    from ovis2.demo import default_layer_gain, write_processor_files
    from ovis2.random_checkpoint import random_model

    config = config_for_size(size)
    model = random_model(config, seed=seed, layer_gain=default_layer_gain(config)).to(torch.bfloat16)
    model.save_pretrained(directory)
    del model
    write_processor_files(directory)
    config_path = directory / "config.json"
    document = json.loads(config_path.read_text())
    document["dtype"] = document["torch_dtype"] = DTYPE  # transformers reads it; ovis2 ignores unknown fields
    config_path.write_text(json.dumps(document, indent=2) + "\n")
    return directory


def ensure_checkpoints(
    size: str = "1B", root: Path | None = None, seed: int = 0, log=print
) -> CheckpointPair:
    """Both layouts of `size`, built on first use (the 1B shapes: about 2.3 GB each, a minute or two)."""
    from .aidc_layout import write_original_layout

    pair = checkpoint_paths(size, root, seed)
    if not (pair.hf / "model.safetensors").is_file():
        log(f"building the random-weight Ovis2-{size} checkpoint (-hf layout, {DTYPE}) in {pair.hf}")
    _build_into(pair.hf, lambda d: write_hf_checkpoint(d, size, seed))
    if not (pair.aidc / "model.safetensors").is_file():
        log(f"rewriting it in the original AIDC layout in {pair.aidc}")
    _build_into(pair.aidc, lambda d: write_original_layout(pair.hf, d, DTYPE))
    return pair
