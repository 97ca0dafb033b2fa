"""Ovis2 in plain PyTorch: the vision tower, the visual tokenizer, Qwen2, and the multimodal glue.

`compat` decides one thing here: whether the vision tower's final RMSNorm runs. The original Ovis2 code,
which the released weights were trained with, never applies it ("ovis", the default); transformers'
port applies it ("transformers"). The checkpoints carry the weight either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_pointwise, native_decode
from .compat import check_compat
from .configuration import Ovis2Config, Ovis2TextConfig, Ovis2VisionConfig
from .cpu_linear import DECODE_ROWS_HINT, Linear, emulates_bf16, matmul, pack_linears
from .errors import Ovis2Error
from .fused_linear import FusedLinears, fuse, in_use
from .layers import (
    PaddedAttentionMetadata,
    PagedAttentionMetadata,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rotary,
    bidirectional_attention,
    default_position_ids,
    padded_attention,
    paged_attention,
)
from .tied_embedding import Embedding

AttentionMetadata = PaddedAttentionMetadata | PagedAttentionMetadata


# ----------------------------------------------------------------------------------------------- vision
class Ovis2VisionEmbeddings(nn.Module):
    def __init__(self, config: Ovis2VisionConfig) -> None:
        super().__init__()
        size = config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=size, stride=size
        )
        self.position_embedding = nn.Embedding(config.num_patches_per_side**2, config.hidden_size)
        self.rms_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self._patches(pixel_values.to(self.patch_embedding.weight.dtype))  # [n, D, 32, 32]
        patches = self.rms_norm(patches.flatten(2).transpose(1, 2))  # [n, 1024, D]
        return patches + self.position_embedding.weight

    def _patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        conv = self.patch_embedding
        if not emulates_bf16(conv.weight):
            return conv(pixel_values)
        bias = conv.bias.float() if conv.bias is not None else None
        return conv._conv_forward(pixel_values.float(), conv.weight.float(), bias).to(conv.weight.dtype)


class Ovis2VisionAttention(nn.Module):
    def __init__(self, config: Ovis2VisionConfig) -> None:
        super().__init__()
        dim, bias = config.hidden_size, config.qkv_bias
        self.num_heads = config.num_attention_heads
        self.q_proj = Linear(dim, dim, bias=bias)
        self.k_proj = Linear(dim, dim, bias=bias)
        self.v_proj = Linear(dim, dim, bias=bias)
        self.out_proj = Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        shape = (n, tokens, self.num_heads, dim // self.num_heads)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = bidirectional_attention(q, k, v)  # [n, heads, tokens, head_dim]
        return self.out_proj(out.transpose(1, 2).reshape(n, tokens, dim))


class Ovis2VisionEncoderLayer(nn.Module):
    def __init__(self, config: Ovis2VisionConfig) -> None:
        super().__init__()
        self.attention = Ovis2VisionAttention(config)
        self.ffn = SwiGLU(config.hidden_size, config.intermediate_size)
        self.rms_norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rms_norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.rms_norm1(x))
        return x + self.ffn(self.rms_norm2(x))


class Ovis2VisionEncoder(nn.Module):
    def __init__(self, config: Ovis2VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Ovis2VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class Ovis2VisionTransformer(nn.Module):
    def __init__(self, config: Ovis2VisionConfig) -> None:
        super().__init__()
        self.embeddings = Ovis2VisionEmbeddings(config)
        self.encoder = Ovis2VisionEncoder(config)
        self.rms_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, pixel_values: torch.Tensor, apply_final_norm: bool) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.rms_norm(x) if apply_final_norm else x


def merge_hidden_stride(features: torch.Tensor, stride: int) -> torch.Tensor:
    """[n, L, D] -> [n, (side/stride)^2, stride^2 * D], padding the square grid at its far edges."""
    if stride == 1:
        return features
    n, length, dim = features.shape
    side = int(length**0.5)
    grid = features.view(n, side, side, dim)
    pad = (-side) % stride
    if pad:
        grid = F.pad(grid, (0, 0, 0, pad, 0, pad))
        side += pad
    grid = grid.view(n, side // stride, stride, side // stride, stride, dim).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(n, (side // stride) ** 2, stride * stride * dim)


class Ovis2VisionModel(nn.Module):
    """Pixels -> probabilities over the visual vocabulary (without the 5 indicator columns)."""

    def __init__(self, config: Ovis2VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Ovis2VisionTransformer(config)
        merged = config.hidden_size * config.hidden_stride**2
        visual_words = config.vocab_size - config.num_visual_indicator_tokens
        self.head_linear = Linear(merged, visual_words, bias=False)
        self.head_norm = nn.LayerNorm(visual_words)

    def forward(self, pixel_values: torch.Tensor, compat: str = "ovis") -> torch.Tensor:
        features = self.transformer(pixel_values, apply_final_norm=compat == "transformers")
        logits = self.head_linear(merge_hidden_stride(features, self.config.hidden_stride))
        return self._tokenize(logits)  # [n, tokens_per_crop, V - 5]

    def _tokenize(self, logits: torch.Tensor) -> torch.Tensor:
        probs = fused_pointwise.layer_norm_softmax(logits, self.head_norm)
        if self.config.tokenize_function == "softmax":
            return probs
        # st_argmax and gumbel_argmax are deterministic one-hot choices at inference.
        return torch.zeros_like(probs).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0)


# ----------------------------------------------------------------------------------------------- text
class Qwen2Attention(nn.Module):
    def __init__(self, config: Ovis2TextConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=False)

    fused_qkv: FusedLinears | None = None

    def fuse_projections(self, dtypes=None, rows_hint: int | None = DECODE_ROWS_HINT) -> bool:
        """q, k and v as one packed product (fused_linear), where packing helps; False when not fused."""
        if not in_use(self.fused_qkv):
            self.fused_qkv = fuse([self.q_proj, self.k_proj, self.v_proj], dtypes, rows_hint)
        return self.fused_qkv is not None

    def _rotated_qkv(self, x: torch.Tensor, rotary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (both rotated) and v: [*lead, heads, head_dim] each."""
        lead, heads, kv_heads = x.shape[:-1], self.num_heads, self.num_kv_heads
        if in_use(self.fused_qkv):
            qkv = self.fused_qkv(x).view(*lead, heads + 2 * kv_heads, self.head_dim)
            qk = apply_rotary(qkv[..., : heads + kv_heads, :], *rotary)  # one RoPE for q and k
            return qk[..., :heads, :], qk[..., heads:, :], qkv[..., heads + kv_heads :, :]
        q = self.q_proj(x).view(*lead, heads, self.head_dim)
        k = self.k_proj(x).view(*lead, kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, kv_heads, self.head_dim)
        return apply_rotary(q, *rotary), apply_rotary(k, *rotary), v

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        lead = x.shape[:-1]  # [B, T] (padded) or [T] (paged)
        q, k, v = self._rotated_qkv(x, rotary)
        if isinstance(meta, PagedAttentionMetadata):
            out = paged_attention(q, k, v, meta, self.layer_index)  # [T, h, d]
        else:
            out = padded_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), meta, self.layer_index
            )
            out = out.transpose(1, 2)  # [B, T, h, d]
        return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: Ovis2TextConfig, layer_index: int) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(config, layer_index)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rotary, meta):
        x = x + self.self_attn(self.input_layernorm(x), rotary, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, config: Ovis2TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        rotary = self.rotary(positions, inputs_embeds.dtype)
        x = native_decode.decoded(
            self.layers, inputs_embeds, rotary, meta
        )  # a compiled decode step, where it runs
        if x is None:
            x = inputs_embeds
            for layer in self.layers:
                x = layer(x, rotary, meta)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------- glue
@dataclass
class Ovis2Output:
    logits: torch.Tensor  # [B, T, V]


class Ovis2Model(nn.Module):
    def __init__(self, config: Ovis2Config) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = Ovis2VisionModel(config.vision_config)
        self.language_model = Qwen2Model(config.text_config)
        self.visual_embeddings_table = nn.Embedding(config.vision_config.vocab_size, config.hidden_size)

    def get_image_embeddings(self, pixel_values: torch.Tensor, compat: str) -> torch.Tensor:
        """[N, 3, 448, 448] crops -> [N, tokens_per_crop, H] soft lookups into the visual table."""
        probs = self.vision_tower(pixel_values, compat)
        table = self.visual_embeddings_table.weight
        words = probs.shape[-1]  # the 5 indicator columns are zero: skip them
        return matmul(probs.to(table.dtype), table[:words])

    def indicator_embeddings(self) -> torch.Tensor:
        count = self.config.vision_config.num_visual_indicator_tokens
        return self.visual_embeddings_table.weight[-count:]  # [5, H]: START, GRID, COL, ROW, END

    def embed_multimodal(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor | None,
        atom_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings with image atoms and indicators filled in; works for [T] or [B, T] ids.

        atom_index: the flat positions of the image atoms in [T] ids, when the caller knows them (the engine):
        then nothing here waits on the device (no count check, no boolean indexing)."""
        embeds = self.language_model.embed_tokens(input_ids)
        if atom_index is None:
            atoms = input_ids == self.config.image_token_id
            num_atoms = int(atoms.sum())
            available = 0 if image_embeds is None else image_embeds.shape[0]
            if num_atoms != available:
                raise Ovis2Error(
                    f"the prompt has {num_atoms} image tokens but the images give {available} embeddings"
                )
            if num_atoms:
                embeds[atoms] = image_embeds.to(embeds.dtype)
        elif image_embeds is not None:
            embeds.index_copy_(0, atom_index, image_embeds.to(embeds.dtype))
        indicators = self.indicator_embeddings().to(embeds.dtype)
        for index, token_id in enumerate(self.config.visual_indicator_token_ids):
            embeds = torch.where((input_ids == token_id).unsqueeze(-1), indicators[index], embeds)
        return embeds


class Ovis2ForConditionalGeneration(nn.Module):
    def __init__(self, config: Ovis2Config, compat: str = "ovis") -> None:
        super().__init__()
        self.config = config
        self.compat = check_compat(compat)
        self.model = Ovis2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        dtype=None,
        device=None,
        compat: str = "ovis",
        torch_dtype=None,
        device_map=None,
        memory_fraction: float = 1.0,
        **unused,
    ):
        """A local directory, "demo", or a hub id; `torch_dtype`/`device_map` are accepted as transformers spells them.
        `dtype` None is "auto" (ovis2.dtypes.resolve_dtype): bf16 on CUDA and on CPUs where it is the faster dtype.

        On CUDA, refuses with a clear error when the weights exceed `memory_fraction` of the card."""
        from .weights import load_model

        dtype = dtype if dtype is not None else torch_dtype
        device = device if device is not None else (device_map if isinstance(device_map, str) else None)
        return load_model(
            cls, path_or_id, dtype=dtype, device=device, compat=compat, memory_fraction=memory_fraction
        )

    def save_pretrained(self, directory) -> None:
        from .weights import save_model

        save_model(self, directory)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def pack_cpu_weights(self) -> int:
        """Linear weights packed for oneDNN where that helps (cpu_linear.packs_weights): the language model's q/k/v
        and gate/up each as one product (fused_linear) and the rest for decode steps, the vision tower's for its
        1024-row products. Returns how many packed weights that made."""
        language = self.model.language_model
        fused = sum(
            module.fuse_projections()
            for module in language.modules()
            if isinstance(module, Qwen2Attention | SwiGLU)
        )
        vision = pack_linears(self.model.vision_tower, rows_hint=None)
        packed = fused + vision + pack_linears(self)
        language.embed_tokens.share_panels(self.lm_head)  # a tied table held once, as the projection's panels
        return packed

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.language_model.embed_tokens.weight
        self.config.tie_word_embeddings = True

    # --- pieces the engine's model runner calls
    def get_image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_embeddings(pixel_values.to(self.device, self.dtype), self.compat)

    def embed_multimodal(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor | None,
        atom_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model.embed_multimodal(input_ids, image_embeds, atom_index)

    def forward_paged(self, inputs_embeds, positions, meta: PagedAttentionMetadata) -> torch.Tensor:
        return self.model.language_model(inputs_embeds, positions, meta)  # [T, H]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @property
    def num_kv_layers(self) -> int:
        return self.config.text_config.num_hidden_layers

    def kv_cache_block_shape(self, block_size: int) -> tuple[int, int, int]:
        text = self.config.text_config
        return (block_size, text.num_key_value_heads, text.head_dim)

    # --- the transformers-like interface
    def forward(
        self,
        input_ids,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        grids=None,
        cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        **unused,
    ) -> Ovis2Output:
        """logits_to_keep: 0 for every position, n for the last n, or a tensor of positions."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        image_embeds = None
        if pixel_values is not None:
            image_embeds = self.get_image_embeddings(pixel_values).flatten(0, 1)
        embeds = self.embed_multimodal(input_ids, image_embeds)
        key_mask = (
            attention_mask.bool() if cache is None else cache.key_mask[:, : cache.length + input_ids.shape[1]]
        )
        meta = PaddedAttentionMetadata(key_mask=key_mask, cache=cache)
        hidden = self.model.language_model(embeds, position_ids, meta)
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return Ovis2Output(logits=self.lm_head(hidden))

    def generate(self, input_ids, pixel_values=None, attention_mask=None, **kwargs) -> torch.Tensor:
        from .generation import generate

        return generate(self, input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs)
