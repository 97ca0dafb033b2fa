"""An -hf Ovis2 checkpoint rewritten in the original AIDC layout (what vLLM's `Ovis` model loads).

Written from the published key map (docs: ovis2-model.md, "The two checkpoint formats"), independently of
`ovis2.weights`, which reads this layout: a converter that shared the loader's table could not catch its bugs.
What vLLM 0.32's `Ovis` needs from the folder (checked in its source, `vllm/transformers_utils/configs/ovis.py`,
`vllm/model_executor/models/ovis.py`, `aimv2.py`, `vllm/transformers_utils/processors/ovis.py`):
- config.json: model_type "ovis" (vLLM registers its own OvisConfig for it, so no remote code files are
  needed), a top-level `hidden_size` (the visual embedding table's width), `llm_config` (model_type "qwen2"),
  `visual_tokenizer_config` with model_type "aimv2_visual_tokenizer" and a `backbone_config` of model_type
  "aimv2" (built as transformers' Aimv2VisionConfig: `qkv_bias`, `mlp_bias`, `rms_norm_eps`, ...).
- weights: `llm.*`, `visual_tokenizer.backbone.{preprocessor,trunk}.*` with fused `attn.qkv`, `mlp.fc1/fc2/fc3`,
  `visual_tokenizer.head.{0,1}`, `vte.weight`; the post-trunk norm may be present (vLLM drops it).
- a tokenizer with `<|image_pad|>` (vLLM's placeholder) and no IMG_* tokens, a CLIP-style preprocessor config
  (`size` height/width, no centre crop) and no chat template: the AIDC tokenizer has none, pass one to vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_TOKENS = ("<IMG_ATOM>", "<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
BACKBONE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "rms_norm_eps",
)
LLM_DROPPED = ("rope_parameters",)  # our -hf writer's spelling; the AIDC config has rope_theta itself

# -hf prefix or infix -> original, applied in order, each at most once per key (lm_head: see original_key).
_RENAMES = (
    ("model.language_model.", "llm.model."),
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
)


def original_key(key: str) -> str:
    if key.startswith("lm_head."):
        return "llm." + key
    for old, new in _RENAMES:
        key = key.replace(old, new, 1)
    return key


def original_state(
    state: dict[str, torch.Tensor], embed_key: str = "model.language_model.embed_tokens.weight"
):
    """The AIDC state dict: q/k/v fused into `attn.qkv` ([3D, D], q rows first), `pos_embed` [1, L, D], and
    `lm_head` stored even when tied (the released AIDC checkpoints store it)."""
    if "lm_head.weight" not in state:
        state = {**state, "lm_head.weight": state[embed_key].clone()}
    out = {}
    for key, tensor in state.items():
        if ".attention.q_proj." in key:
            parts = [state[key.replace("q_proj", name)] for name in ("q_proj", "k_proj", "v_proj")]
            out[original_key(key).replace(".attention.q_proj.", ".attn.qkv.")] = torch.cat(parts, dim=0)
        elif ".attention.k_proj." in key or ".attention.v_proj." in key:
            continue
        elif key.endswith("position_embedding.weight"):
            out[original_key(key)] = tensor.unsqueeze(0).contiguous()
        else:
            out[original_key(key)] = tensor.contiguous()
    return out


def original_config(hf: dict, dtype: str = "bfloat16") -> dict:
    """config.json of the AIDC layout from an -hf config.json (a dict)."""
    text, vision = dict(hf["text_config"]), hf["vision_config"]
    rope = text.get("rope_parameters") or {}
    text.setdefault("rope_theta", rope.get("rope_theta", 1_000_000.0))
    llm = {k: v for k, v in text.items() if k not in LLM_DROPPED}
    llm |= {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "torch_dtype": dtype,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        "use_sliding_window": False,
    }
    backbone = {k: vision[k] for k in BACKBONE_FIELDS if k in vision}
    backbone |= {
        "model_type": "aimv2",
        "qkv_bias": bool(vision.get("qkv_bias", False)),
        "use_bias": bool(vision.get("mlp_bias", False)),
        "mlp_bias": bool(vision.get("mlp_bias", False)),
        "hidden_act": vision.get("hidden_act", "silu"),
    }
    return {
        "architectures": ["Ovis"],
        "model_type": "ovis",
        "hidden_size": text["hidden_size"],
        "multimodal_max_length": 32768,
        "conversation_formatter_class": "QwenConversationFormatter",
        "llm_config": llm,
        "visual_tokenizer_config": {
            "model_type": "aimv2_visual_tokenizer",
            "backbone_config": backbone,
            "vocab_size": vision["vocab_size"],
            "hidden_stride": vision["hidden_stride"],
            "tokenize_function": vision["tokenize_function"],
            "tau": 1.0,
            "drop_cls_token": False,
        },
        "torch_dtype": dtype,
    }


def original_tokenizer_files(tokenizer_json: dict, tokenizer_config: dict) -> tuple[dict, dict]:
    """The -hf tokenizer without the six IMG_* added tokens (the AIDC tokenizer has none) and no chat template."""
    tokenizer_json = dict(tokenizer_json)
    tokenizer_json["added_tokens"] = [
        t for t in tokenizer_json["added_tokens"] if t["content"] not in IMAGE_TOKENS
    ]
    config = {k: v for k, v in tokenizer_config.items() if k != "chat_template"}
    if isinstance(config.get("extra_special_tokens"), list):
        config["extra_special_tokens"] = [t for t in config["extra_special_tokens"] if t not in IMAGE_TOKENS]
    if isinstance(config.get("added_tokens_decoder"), dict):
        config["added_tokens_decoder"] = {
            k: v for k, v in config["added_tokens_decoder"].items() if v.get("content") not in IMAGE_TOKENS
        }
    return tokenizer_json, config


def original_preprocessor_config(image_size: int = 448) -> dict:
    size = {"height": image_size, "width": image_size}
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": size,
        "crop_size": size,
        "do_center_crop": False,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": True,
    }


def write_original_layout(hf_dir: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Rewrite the -hf checkpoint in `hf_dir` as the AIDC one in `out_dir` (weights keep their dtype)."""
    from safetensors.torch import load_file, save_file

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = json.loads((hf_dir / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps(original_config(hf, dtype), indent=2) + "\n")
    tokenizer, config = original_tokenizer_files(
        json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8")),
        json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8")),
    )
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    image_size = hf["vision_config"].get("image_size", 448)
    (out_dir / "preprocessor_config.json").write_text(
        json.dumps(original_preprocessor_config(image_size), indent=2)
    )
    state = original_state(load_file(str(hf_dir / "model.safetensors")))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
