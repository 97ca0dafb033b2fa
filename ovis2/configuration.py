"""Ovis2Config and Ovis2VisionConfig: read both checkpoint formats, write the -hf one, validate."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import Ovis2Error
from .tokenizer import IMAGE_ATOM_ID, VISUAL_INDICATOR_IDS


def read_json_object(path: Path) -> dict:
    """A checkpoint's JSON file that must hold an object; anything else is an Ovis2Error naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise Ovis2Error(f"{path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise Ovis2Error(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def _required(source: dict, name: str, where: str) -> Any:
    if name not in source or source[name] is None:
        raise Ovis2Error(f"config.json: field '{where}.{name}' is missing")
    return source[name]


def _section(source: dict, name: str, where: str) -> dict:
    value = _required(source, name, where)
    if not isinstance(value, dict):
        raise Ovis2Error(f"config.json: field '{where}.{name}' must be an object, got {type(value).__name__}")
    return value


def _known_fields(cls, source: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in source.items() if k in names}


def _check_positive(obj, names: tuple[str, ...], where: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise Ovis2Error(f"config.json: field '{where}.{name}' must be a positive integer, got {value!r}")


def _check_positive_real(obj, names: tuple[str, ...], where: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < float("inf"):
            raise Ovis2Error(f"config.json: field '{where}.{name}' must be a positive number, got {value!r}")


@dataclass
class Ovis2VisionConfig:
    """The AIMv2-style vision tower plus the visual tokenizer head."""

    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    vocab_size: int = 65536  # visual vocabulary, including the 5 indicator rows
    hidden_stride: int = 2
    num_visual_indicator_tokens: int = 5
    tokenize_function: str = "softmax"

    REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_crop(self) -> int:
        side = -(-self.num_patches_per_side // self.hidden_stride)
        return side * side

    def validate(self) -> None:
        _check_positive(
            self, self.REQUIRED + ("image_size", "patch_size", "hidden_stride", "vocab_size"), "vision_config"
        )
        _check_positive_real(self, ("rms_norm_eps",), "vision_config")
        if self.hidden_size % self.num_attention_heads:
            raise Ovis2Error(
                "config.json: 'vision_config.hidden_size' must be divisible by 'num_attention_heads'"
            )
        if self.tokenize_function not in ("softmax", "st_argmax", "gumbel_argmax"):
            raise Ovis2Error(
                f"config.json: 'vision_config.tokenize_function' {self.tokenize_function!r} is unknown"
            )
        if self.vocab_size <= self.num_visual_indicator_tokens:
            raise Ovis2Error("config.json: 'vision_config.vocab_size' must exceed the indicator token count")
        if self.hidden_act != "silu":
            raise Ovis2Error(f"config.json: 'vision_config.hidden_act' {self.hidden_act!r} is not supported")

    @classmethod
    def from_dict(cls, source: dict) -> Ovis2VisionConfig:
        for name in cls.REQUIRED:
            _required(source, name, "vision_config")
        return cls(**_known_fields(cls, source))

    def to_dict(self) -> dict:
        return {"model_type": "ovis2_vision", **asdict(self)}


@dataclass
class Ovis2TextConfig:
    """The Qwen2 language model."""

    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    vocab_size: int = 151936
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"

    REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        _check_positive(
            self, self.REQUIRED + ("num_key_value_heads", "max_position_embeddings"), "text_config"
        )
        _check_positive_real(self, ("rms_norm_eps", "rope_theta"), "text_config")
        if self.hidden_size % self.num_attention_heads:
            raise Ovis2Error(
                "config.json: 'text_config.hidden_size' must be divisible by 'num_attention_heads'"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise Ovis2Error(
                "config.json: 'text_config.num_attention_heads' must be a multiple of 'num_key_value_heads'"
            )
        if self.hidden_act != "silu":
            raise Ovis2Error(f"config.json: 'text_config.hidden_act' {self.hidden_act!r} is not supported")

    @classmethod
    def from_dict(cls, source: dict) -> Ovis2TextConfig:
        for name in cls.REQUIRED:
            _required(source, name, "text_config")
        values = _known_fields(cls, source)
        rope = source.get("rope_parameters") or source.get("rope_scaling") or {}
        if "rope_theta" not in values and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = source["num_attention_heads"]
        return cls(**values)

    def to_dict(self, tie_word_embeddings: bool) -> dict:
        values = asdict(self)
        values["rope_parameters"] = {"rope_type": "default", "rope_theta": values["rope_theta"]}
        return {"model_type": "qwen2", **values, "tie_word_embeddings": tie_word_embeddings}


def _is_token_id(value, text: Ovis2TextConfig) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < text.vocab_size


@dataclass
class Ovis2Config:
    text_config: Ovis2TextConfig = field(default_factory=Ovis2TextConfig)
    vision_config: Ovis2VisionConfig = field(default_factory=Ovis2VisionConfig)
    image_token_id: int = IMAGE_ATOM_ID
    visual_indicator_token_ids: tuple[int, ...] = VISUAL_INDICATOR_IDS
    tie_word_embeddings: bool = False  # decided on load by whether the checkpoint holds lm_head.weight
    source_format: str = "hf"  # "hf" (model_type ovis2) or "ovis" (original AIDC, model_type ovis)

    def __post_init__(self) -> None:
        ids = self.visual_indicator_token_ids
        if not isinstance(ids, list | tuple) or not all(_is_token_id(i, self.text_config) for i in ids):
            raise Ovis2Error("config.json: 'visual_indicator_token_ids' must be a list of text token ids")
        self.visual_indicator_token_ids = tuple(ids)
        if len(self.visual_indicator_token_ids) != self.vision_config.num_visual_indicator_tokens:
            raise Ovis2Error("config.json: 'visual_indicator_token_ids' must hold one id per indicator token")
        if not _is_token_id(self.image_token_id, self.text_config):
            raise Ovis2Error("config.json: 'image_token_id' must be a token id of the text vocabulary")

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @classmethod
    def from_dict(cls, source: dict) -> Ovis2Config:
        model_type = source.get("model_type")
        if model_type == "ovis2":
            return cls._from_hf(source)
        if model_type == "ovis":
            return cls._from_original(source)
        raise Ovis2Error(
            f"config.json: 'model_type' must be 'ovis2' (-hf) or 'ovis' (original), got {model_type!r}"
        )

    @classmethod
    def _from_hf(cls, source: dict) -> Ovis2Config:
        return cls(
            text_config=Ovis2TextConfig.from_dict(_section(source, "text_config", "config")),
            vision_config=Ovis2VisionConfig.from_dict(_section(source, "vision_config", "config")),
            image_token_id=source.get("image_token_id", IMAGE_ATOM_ID),
            visual_indicator_token_ids=source.get("visual_indicator_token_ids", VISUAL_INDICATOR_IDS),
            tie_word_embeddings=bool(source.get("tie_word_embeddings", False)),
            source_format="hf",
        )

    @classmethod
    def _from_original(cls, source: dict) -> Ovis2Config:
        visual = _section(source, "visual_tokenizer_config", "config")
        backbone = _section(visual, "backbone_config", "visual_tokenizer_config")
        vision = {**backbone, "vocab_size": _required(visual, "vocab_size", "visual_tokenizer_config")}
        vision["hidden_stride"] = visual.get("hidden_stride", 1)
        vision["tokenize_function"] = visual.get("tokenize_function", "softmax")
        vision["qkv_bias"] = backbone.get("qkv_bias", False)
        vision["mlp_bias"] = backbone.get("use_bias", False)
        return cls(
            text_config=Ovis2TextConfig.from_dict(_section(source, "llm_config", "config")),
            vision_config=Ovis2VisionConfig.from_dict(vision),
            source_format="ovis",
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Ovis2Config:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise Ovis2Error(f"no config.json in {directory}")
        return cls.from_dict(read_json_object(path))

    def to_dict(self) -> dict:
        """The -hf form, loadable by transformers' Ovis2 as well."""
        return {
            "architectures": ["Ovis2ForConditionalGeneration"],
            "model_type": "ovis2",
            "text_config": self.text_config.to_dict(self.tie_word_embeddings),
            "vision_config": self.vision_config.to_dict(),
            "image_token_id": self.image_token_id,
            "visual_indicator_token_ids": list(self.visual_indicator_token_ids),
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


_AIMV2 = {
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, intermediate_size=2816),
    "huge": dict(hidden_size=1536, num_hidden_layers=24, num_attention_heads=12, intermediate_size=4096),
    "1B": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=5632),
}
_QWEN = {
    "1B": (896, 24, 14, 2, 4864, 151936, True, "large"),
    "2B": (1536, 28, 12, 2, 8960, 151936, True, "large"),
    "4B": (2048, 36, 16, 2, 11008, 151936, True, "huge"),
    "8B": (3584, 28, 28, 4, 18944, 152064, False, "huge"),
    "16B": (5120, 48, 40, 8, 13824, 152064, False, "huge"),
    "34B": (5120, 64, 40, 8, 27648, 152064, False, "1B"),
}
OVIS2_SIZES = tuple(_QWEN)


def config_for_size(size: str) -> Ovis2Config:
    """The exact shapes of a released Ovis2 size ("1B" ... "34B"), for speed work with random weights."""
    if size not in _QWEN:
        raise Ovis2Error(f"unknown Ovis2 size {size!r}; choose one of {', '.join(OVIS2_SIZES)}")
    hidden, layers, heads, kv_heads, inter, vocab, tied, vit = _QWEN[size]
    text = Ovis2TextConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        vocab_size=vocab,
    )
    return Ovis2Config(
        text_config=text, vision_config=Ovis2VisionConfig(**_AIMV2[vit]), tie_word_embeddings=tied
    )
