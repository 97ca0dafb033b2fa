"""Helpers the model tests share: tiny checkpoint shapes, prompts with image placeholders, the AIDC layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ovis2.demo import tiny_config
from ovis2.image_layout import placeholder_ids

# name -> tiny_config arguments; together they cover stride 1 and 2, GQA and MHA, tied and untied, 1-3 layers.
SHAPES = {
    "stride2_gqa_untied": dict(text=dict(num_hidden_layers=2), vision=dict(num_hidden_layers=2)),
    "stride1_mha_tied": dict(
        text=dict(num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3),
        vision=dict(hidden_stride=1, num_hidden_layers=1),
        tie_word_embeddings=True,
    ),
    "stride2_gqa_tied": dict(
        text=dict(num_attention_heads=8, num_key_value_heads=2), tie_word_embeddings=True
    ),
}


def shape_config(name: str):
    return tiny_config(**SHAPES[name])


def prompt_ids(text_chunks: list[list[int]], grids: list[tuple[int, int]], tokens_per_crop: int) -> list[int]:
    """text_chunks[0] + image 0 + text_chunks[1] + image 1 + ... (one more chunk than images)."""
    ids = list(text_chunks[0])
    for grid, chunk in zip(grids, text_chunks[1:], strict=True):
        ids += placeholder_ids(grid, tokens_per_crop) + list(chunk)
    return ids


def random_pixels(grids: list[tuple[int, int]], seed: int) -> torch.Tensor:
    crops = sum(1 if r * c == 1 else r * c + 1 for r, c in grids)
    return torch.randn(crops, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


# --- the original AIDC layout, derived independently of ovis2.weights (the reverse direction)
def _original_key(key: str) -> str:
    renames = [
        ("model.language_model.", "llm.model."),
        ("lm_head.", "llm.lm_head."),
        ("model.visual_embeddings_table.weight", "vte.weight"),
        ("model.vision_tower.head_linear.", "visual_tokenizer.head.0."),
        ("model.vision_tower.head_norm.", "visual_tokenizer.head.1."),
        (
            "model.vision_tower.transformer.embeddings.patch_embedding.",
            "visual_tokenizer.backbone.preprocessor.patchifier.proj.",
        ),
        (
            "model.vision_tower.transformer.embeddings.rms_norm.",
            "visual_tokenizer.backbone.preprocessor.patchifier.norm.",
        ),
        (
            "model.vision_tower.transformer.embeddings.position_embedding.weight",
            "visual_tokenizer.backbone.preprocessor.pos_embed",
        ),
        ("model.vision_tower.transformer.rms_norm.", "visual_tokenizer.backbone.trunk.post_trunk_norm."),
        ("model.vision_tower.transformer.encoder.layers.", "visual_tokenizer.backbone.trunk.blocks."),
        (".rms_norm1.", ".norm_1."),
        (".rms_norm2.", ".norm_2."),
        (".attention.out_proj.", ".attn.proj."),
        (".ffn.gate_proj.", ".mlp.fc1."),
        (".ffn.up_proj.", ".mlp.fc3."),
        (".ffn.down_proj.", ".mlp.fc2."),
    ]
    for old, new in renames:
        key = key.replace(old, new)
    return key


def write_original_layout(hf_dir: Path, out_dir: Path) -> Path:
    """Rewrite an -hf checkpoint as the original AIDC one (qkv fused, pos_embed [1, L, D], lm_head stored)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = load_file(str(hf_dir / "model.safetensors"))
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"].clone()
    original = {}
    for key, tensor in state.items():
        if ".attention.q_proj." in key:
            k_key, v_key = key.replace("q_proj", "k_proj"), key.replace("q_proj", "v_proj")
            fused = torch.cat([tensor, state[k_key], state[v_key]], dim=0)
            original[_original_key(key).replace(".attention.q_proj.", ".attn.qkv.")] = fused
        elif ".attention.k_proj." in key or ".attention.v_proj." in key:
            continue
        elif key.endswith("position_embedding.weight"):
            original[_original_key(key)] = tensor.unsqueeze(0).contiguous()
        else:
            original[_original_key(key)] = tensor
    save_file(original, str(out_dir / "model.safetensors"))
    hf = json.loads((hf_dir / "config.json").read_text())
    vision = hf["vision_config"]
    config = {
        "model_type": "ovis",
        "llm_config": hf["text_config"],
        "visual_tokenizer_config": {
            "backbone_config": {
                k: vision[k]
                for k in (
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "image_size",
                    "patch_size",
                    "rms_norm_eps",
                )
            },
            "vocab_size": vision["vocab_size"],
            "hidden_stride": vision["hidden_stride"],
            "tokenize_function": vision["tokenize_function"],
        },
        "multimodal_max_length": 32768,
    }
    (out_dir / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, out_dir / name)
    return out_dir
