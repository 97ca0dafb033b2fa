"""Read a checkpoint's safetensors, map the original AIDC layout to -hf, fill the model in place."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from .checkpoint import resolve_checkpoint
from .configuration import Ovis2Config
from .dtypes import resolve_dtype
from .errors import Ovis2Error
from .host_memory import check_fits
from .meta_build import build_on_meta

logger = logging.getLogger(__name__)
PROGRESS_BAR_BYTES = 1 << 30


def infer_device() -> str:
    """ "cuda" when a GPU is visible, else "cpu" (as transformers' helper of that name answers)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise Ovis2Error(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from error
    if resolved.type not in ("cpu", "cuda"):
        raise Ovis2Error(f"device {device!r} is not served; use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise Ovis2Error("device 'cuda' was requested but no GPU is visible (in Docker: run with --gpus all)")
    return resolved


WEIGHTS_HEADROOM_BYTES = 1 << 30


def check_weights_fit(model, dtype: torch.dtype, device: torch.device, memory_fraction: float) -> None:
    """Refuse at start, with the sizes, when the weights cannot fit the allowed share of the GPU, or the host's
    available memory on a CPU."""
    unique = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() for p in unique) * torch.empty((), dtype=dtype).element_size()
    if device.type == "cpu":
        name = str(dtype).removeprefix("torch.")
        check_fits(
            weights, f"the model's weights in {name}", "use --dtype bfloat16, a smaller model or more memory"
        )
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    allowed = min(free, int(total * memory_fraction))
    if weights + WEIGHTS_HEADROOM_BYTES > allowed:
        gib = 1 << 30
        raise Ovis2Error(
            f"the weights need {weights / gib:.1f} GiB in {str(dtype).removeprefix('torch.')} plus "
            f"{WEIGHTS_HEADROOM_BYTES / gib:.0f} GiB headroom, but only {allowed / gib:.1f} GiB of this GPU "
            f"({total / gib:.1f} GiB, {free / gib:.1f} GiB free) may be used: raise --gpu-memory-utilization, "
            "use --dtype bfloat16, or use a larger GPU"
        )


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise Ovis2Error(f"{index} is not a valid safetensors index: {error}") from error
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise Ovis2Error(f"no *.safetensors weights in {directory}")
    for file in files:
        if not file.is_file():
            raise Ovis2Error(f"weight file {file.name} named in the index is missing from {directory}")
    return files


def iter_tensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    total = sum(f.stat().st_size for f in files)
    bar = _progress_bar(total)
    for file in files:
        try:
            with safe_open(file, framework="pt", device=str(device)) as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as error:
            raise Ovis2Error(f"weight file {file} is corrupt or unreadable: {error}") from error
        if bar is not None:
            bar.update(file.stat().st_size)
    if bar is not None:
        bar.close()


def _progress_bar(total_bytes: int):
    if total_bytes < PROGRESS_BAR_BYTES:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights")


# --- original AIDC layout -> -hf layout
_ORIGINAL_RENAMES = (
    (r"^llm\.model\.", "model.language_model."),
    (r"^llm\.lm_head\.", "lm_head."),
    (r"^vte\.weight$", "model.visual_embeddings_table.weight"),
    (r"^visual_tokenizer\.head\.0\.", "model.vision_tower.head_linear."),
    (r"^visual_tokenizer\.head\.1\.", "model.vision_tower.head_norm."),
    (r"^visual_tokenizer\.backbone\.", "model.vision_tower.transformer."),
    (r"\.preprocessor\.patchifier\.proj\.", ".embeddings.patch_embedding."),
    (r"\.preprocessor\.patchifier\.norm\.", ".embeddings.rms_norm."),
    (r"\.preprocessor\.pos_embed$", ".embeddings.position_embedding.weight"),
    (r"\.trunk\.post_trunk_norm\.", ".rms_norm."),
    (r"\.trunk\.blocks\.(\d+)\.", r".encoder.layers.\1."),
    (r"\.norm_1\.", ".rms_norm1."),
    (r"\.norm_2\.", ".rms_norm2."),
    (r"\.attn\.proj\.", ".attention.out_proj."),
    (r"\.mlp\.fc1\.", ".ffn.gate_proj."),
    (r"\.mlp\.fc3\.", ".ffn.up_proj."),
    (r"\.mlp\.fc2\.", ".ffn.down_proj."),
)


def original_to_hf(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    for pattern, replacement in _ORIGINAL_RENAMES:
        key = re.sub(pattern, replacement, key)
    if key.endswith("embeddings.position_embedding.weight") and tensor.dim() == 3:
        return [(key, tensor.squeeze(0))]  # [1, 1024, D] -> [1024, D]
    if ".attn.qkv." in key:
        q, k, v = tensor.chunk(3, dim=0)
        return [
            (key.replace(".attn.qkv.", f".attention.{name}_proj."), t)
            for name, t in zip("qkv", (q, k, v), strict=True)
        ]
    return [(key, tensor)]


def load_model(cls, path_or_id, dtype=None, device=None, compat: str = "ovis", memory_fraction: float = 1.0):
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    directory = resolve_checkpoint(path_or_id, model_class=cls)
    config = Ovis2Config.from_pretrained(directory)
    model = build_on_meta(lambda: cls(config, compat=compat))
    check_weights_fit(model, dtype, device, memory_fraction)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    loaded = _read_state_dict(directory, config, expected, dtype, device)
    has_head = "lm_head.weight" in loaded
    missing = sorted(set(expected) - set(loaded) - ({"lm_head.weight"} if not has_head else set()))
    if missing:
        raise Ovis2Error(f"checkpoint {directory} lacks tensors: {', '.join(missing[:10])}")
    model.load_state_dict(loaded, strict=False, assign=True)
    if not has_head:
        model.tie_weights()
    else:
        model.config.tie_word_embeddings = False
    _check_no_meta(model)
    return model.eval()


def _read_state_dict(directory, config, expected, dtype, device) -> dict[str, torch.Tensor]:
    loaded, unexpected, misshaped = {}, [], []
    for raw_key, raw in iter_tensors(safetensors_files(directory), device):
        pairs = original_to_hf(raw_key, raw) if config.source_format == "ovis" else [(raw_key, raw)]
        for key, tensor in pairs:
            if key not in expected:
                unexpected.append(key)
            elif tuple(tensor.shape) != tuple(expected[key]):
                misshaped.append(f"{key} {tuple(tensor.shape)} != {tuple(expected[key])}")
            else:
                converted = tensor.to(dtype) if tensor.is_floating_point() else tensor
                loaded[key] = _owned(converted) if converted is tensor else converted
    if unexpected:
        raise Ovis2Error(
            f"checkpoint {directory} has unexpected tensors: {', '.join(sorted(unexpected)[:10])}"
        )
    if misshaped:
        raise Ovis2Error(
            f"checkpoint {directory} has tensors of the wrong shape: {'; '.join(misshaped[:10])}"
        )
    return loaded


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor read from a safetensors file on CPU is a view of the file's mapping, often off a 64-byte
    boundary: a fresh copy owns its memory and is aligned. Aligned, matmul kernels take their aligned path (and
    the same summation order, hence the same results, for every copy of a checkpoint); owned, the mapping goes
    once the loader lets go of it, not when the last tensor viewing it does (a kept norm weight held the whole
    file resident beside the packed weights: +2.3 GB RSS for the 1B shapes)."""
    return tensor.clone() if tensor.device.type == "cpu" else tensor


def _check_no_meta(model) -> None:
    left = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    assert not left, f"parameters left on the meta device: {left}"


def save_model(model, directory) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
