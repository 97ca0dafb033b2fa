"""A decode step's decoder layers in one compiled call, where bf16 products are `bf16_rows`' kernel (CPUs with AVX2
and FMA but no bf16 instructions, such as AMD Zen 3).

There a batch-1 decode step of Ovis2-1B spent ~12 ms of ~45 outside its products (Zen 3): ~95 PyTorch ops and
their Python per layer between the compiled products, RMSNorms and attention. `kernels/decode_layers.c` runs the
whole stack of layers in one call: it calls those same kernels (through their function pointers) and does the
steps between them itself (RoPE, the KV cache writes, the residual adds, SiLU-and-multiply), rounding to bf16 where
PyTorch's ops round, so its outputs are the layer-by-layer path's up to SiLU's exp in fp32's last bit (Zen 3,
alternating the two: a batch-1 step 48.5 -> 38.5 ms, batch 16 1.12-1.23x, the same greedy tokens).
It applies to decode steps of the engine's paged cache (one new token per sequence) over weights packed as
`bf16_rows`' panels, q/k/v and gate/up each fused into one (`fused_linear`); `decoded` returns None everywhere
else, and where `OVIS2_NATIVE_DECODE=0`, a kernel is missing, or the self-test disagrees.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from . import bf16_rows, cpu_linear, decode_attention, fused_pointwise, native_build
from .bf16_rows import PanelWeight, panels_of
from .fused_linear import in_use
from .layers import PagedAttentionMetadata, apply_rotary

SOURCE = native_build.KERNELS / "decode_layers.c"
_POINTER, _INT64 = ctypes.c_void_p, ctypes.c_int64


class Kernels(ctypes.Structure):
    _fields_ = [("product", _POINTER), ("rms_norm", _POINTER), ("attention", _POINTER)]


class Dims(ctypes.Structure):
    _fields_ = [
        (name, _INT64)
        for name in (
            "hidden",
            "heads",
            "kv_heads",
            "head_dim",
            "intermediate",
            "block_size",
            "num_blocks",
            "max_blocks",
        )
    ] + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]


PRODUCTS = ("qkv", "o", "gate_up", "down")  # read as panels
WEIGHTS = (
    "input_norm",
    "qkv",
    "qkv_bias",
    "o",
    "o_bias",
    "post_norm",
    "gate_up",
    "gate_up_bias",
    "down",
    "down_bias",
)


class Layer(ctypes.Structure):
    _fields_ = [(name, _POINTER) for name in (*WEIGHTS, "k_cache", "v_cache")]


SIGNATURES = {
    "decode_layers_bf16": ([_POINTER] * 3 + [_INT64] + [_POINTER] * 6 + [_INT64, ctypes.c_int], ctypes.c_int),
    "silu_mul_bf16": ([_POINTER] * 2 + [_INT64] * 2 + [ctypes.c_int], None),
}


@dataclass
class Stack:
    """The compiled call and the kernels it calls."""

    library: ctypes.CDLL
    kernels: Kernels


def decoded(layers, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], meta) -> torch.Tensor | None:
    """x [seqs, hidden] after every one of `layers` (Qwen2DecoderLayer) for a decode step over the paged cache in
    `meta`, its keys and values written there; None where the compiled stack does not apply (nothing written)."""
    if not _is_decode_step(x, rotary, meta):
        return None
    stack = compiled_stack()
    if stack is None:
        return None
    dims = _dims(layers[0], x, meta.kv_caches[0][0], meta.block_tables)
    if dims is None or not _shapes_fit(x, rotary, meta, dims):
        return None
    weights = _layer_weights(layers, meta.kv_caches, dims)
    if weights is None:
        return None
    return _run(stack, dims, weights, x, rotary, meta)


def _is_decode_step(x, rotary, meta) -> bool:
    if not isinstance(meta, PagedAttentionMetadata) or not meta.kv_caches:
        return False
    if meta.max_query_len != 1 or meta.starts_at_zero or x.dim() != 2:
        return False
    if x.shape[0] < 1 or meta.num_seqs != x.shape[0]:
        return False
    if not native_build.kernel_may_take(x, *rotary) or rotary[0].shape != rotary[1].shape:
        return False
    indices = (meta.slot_mapping, meta.block_tables, meta.seq_lens)
    return all(t.dtype == torch.int64 and t.device.type == "cpu" for t in indices)


def _shapes_fit(x, rotary, meta, dims: Dims) -> bool:
    """The step's rows as the kernel reads them: cos and sin [seqs, head_dim], one slot and one table row a
    sequence (the caches are checked with the weights)."""
    seqs = x.shape[0]
    if any(tuple(t.shape) != (seqs, dims.head_dim) for t in rotary):
        return False
    indices = meta.slot_mapping.shape == (seqs,) and meta.seq_lens.shape == (seqs,)
    return indices and meta.block_tables.shape == (seqs, dims.max_blocks)


def _dims(layer, x, k_cache, block_tables) -> Dims | None:
    attention, norm = layer.self_attn, layer.input_layernorm
    if k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != (attention.num_kv_heads, attention.head_dim):
        return None
    if block_tables.dim() != 2:
        return None
    return Dims(
        hidden=x.shape[1],
        heads=attention.num_heads,
        kv_heads=attention.num_kv_heads,
        head_dim=attention.head_dim,
        intermediate=layer.mlp.down_proj.in_features,
        block_size=k_cache.shape[1],
        num_blocks=k_cache.shape[0],
        max_blocks=block_tables.shape[1],
        eps=norm.eps,
        scale=attention.head_dim**-0.5,
    )


@dataclass
class _Table:
    # what it was built for: the weights' generation, the caches' addresses and layouts, the shapes
    key: tuple
    sources: tuple  # every weight tensor it points into (held: their memory stays while it does)
    layouts: tuple  # their addresses and shapes then
    table: ctypes.Array


_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layers -> their last _Table
_SHAPE_FIELDS = ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "block_size", "num_blocks", "eps")


def _layer_weights(layers, kv_caches, dims: Dims) -> ctypes.Array | None:
    """Each layer's weight and cache pointers, or None where any is not what the kernel reads: contiguous bf16
    tensors of the expected shapes, the products' panels (q/k/v and gate/up fused into one each). Kept between steps
    while every weight is the same tensor at the same address and shape, no `Linear` changed its weights
    (`cpu_linear.weights_generation`) and the caches are where they were: checking everything again took ~1.2 ms a
    step for 24 layers. Not kept with grad mode on (whether autograd watches a weight can change any time)."""
    if torch.is_grad_enabled() or not isinstance(layers, torch.nn.Module):
        return _built_table(layers, kv_caches, dims)
    sources = _sources(layers)
    caches = tuple((c.data_ptr(), c.shape, c.stride(), c.dtype) for pair in kv_caches for c in pair)
    key = (cpu_linear.weights_generation(), caches, tuple(getattr(dims, name) for name in _SHAPE_FIELDS))
    cached = _tables.get(layers)
    if cached is not None and cached.key == key and _unmoved(cached, sources):
        return cached.table
    built = _built_table(layers, kv_caches, dims) if sources is not None else None
    if built is None:
        _tables.pop(layers, None)
        return None
    _tables[layers] = _Table(key, sources, _layouts(sources), built)
    return built


def _sources(layers) -> tuple | None:
    """The weight tensors the table reads, layer after layer; None where a group is not fused."""
    found = []
    for layer in layers:
        own = _layer_sources(layer)
        if own is None:
            return None
        found += own
    return tuple(found)


def _layer_sources(layer) -> tuple | None:
    """One layer's weight tensors in `WEIGHTS`' order (a product's: its panels' data; None for an absent bias),
    gathered unchecked; None where q/k/v or gate/up was never fused or a product is not laid out as panels."""
    attention, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = attention.fused_qkv, attention.o_proj, mlp.fused_gate_up, mlp.down_proj
    if qkv is None or gate_up is None:
        return None
    panels = (qkv.packed, o.packed_weight, gate_up.packed, down.packed_weight)
    if not all(isinstance(weight, PanelWeight) for weight in panels):
        return None
    qkv_panels, o_panels, gate_up_panels, down_panels = panels
    return (
        layer.input_layernorm.weight,
        qkv_panels.data,
        qkv.bias,
        o_panels.data,
        o.bias,
        layer.post_attention_layernorm.weight,
        gate_up_panels.data,
        gate_up.bias,
        down_panels.data,
        down.bias,
    )


def _layouts(sources: tuple) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), t.shape) for t in sources)


def _unmoved(cached: _Table, sources: tuple | None) -> bool:
    if sources is None or len(sources) != len(cached.sources):
        return False
    return (
        all(a is b for a, b in zip(sources, cached.sources, strict=True))
        and _layouts(sources) == cached.layouts
    )


def _built_table(layers, kv_caches, dims: Dims) -> ctypes.Array | None:
    if len(kv_caches) != len(layers):
        return None
    table = (Layer * len(layers))()
    for entry, layer, caches in zip(table, layers, kv_caches, strict=True):
        tensors = _tensors(layer, dims)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if tensors is None or any(ctypes.c_float(norm.eps).value != dims.eps for norm in norms):
            return None  # (the RMSNorm kernel takes eps in fp32 too)
        cache_shape = (dims.num_blocks, dims.block_size, dims.kv_heads, dims.head_dim)
        if not all(_plain(c, cache_shape) for c in caches):
            return None
        for name, tensor in zip(WEIGHTS, tensors, strict=True):
            setattr(entry, name, None if tensor is None else tensor.data_ptr())
        entry.k_cache, entry.v_cache = (c.data_ptr() for c in caches)
    return table


def _tensors(layer, dims: Dims) -> tuple | None:
    """`_layer_sources`, where each is what the kernel reads: the groups in use, every tensor contiguous bf16 of
    its shape (a bias may be absent)."""
    attention, mlp = layer.self_attn, layer.mlp
    if not (in_use(attention.fused_qkv) and in_use(mlp.fused_gate_up)):
        return None
    tensors, shapes = _layer_sources(layer), _weight_shapes(dims)
    if tensors is None:
        return None
    for name, tensor in zip(WEIGHTS, tensors, strict=True):
        optional = name.endswith("_bias")
        if (tensor is None and not optional) or (tensor is not None and not _plain(tensor, shapes[name])):
            return None
    return tensors


def _weight_shapes(dims: Dims) -> dict:
    """Each of `WEIGHTS`' shapes, by name (a product's: its panels')."""
    hidden, inter = dims.hidden, dims.intermediate
    attended = dims.heads * dims.head_dim
    width = attended + 2 * dims.kv_heads * dims.head_dim
    return dict(
        input_norm=(hidden,),
        qkv=_panels_shape(width, hidden),
        qkv_bias=(width,),
        o=_panels_shape(hidden, attended),
        o_bias=(hidden,),
        post_norm=(hidden,),
        gate_up=_panels_shape(2 * inter, hidden),
        gate_up_bias=(2 * inter,),
        down=_panels_shape(hidden, inter),
        down_bias=(hidden,),
    )


def _panels_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    panel = bf16_rows.PANEL
    return (-(-out_features // panel), in_features, panel)


def _plain(tensor: torch.Tensor, shape: tuple) -> bool:
    return (
        tensor.layout == torch.strided
        and tuple(tensor.shape) == shape
        and tensor.is_contiguous()
        and native_build.kernel_may_take(tensor)
    )


def _run(stack: Stack, dims: Dims, weights, x, rotary, meta) -> torch.Tensor | None:
    out = x.clone(memory_format=torch.contiguous_format)
    cos, sin = (t.contiguous() for t in rotary)
    tables = meta.block_tables.contiguous()
    slots, lens = meta.slot_mapping.contiguous(), meta.seq_lens.contiguous()
    status = stack.library.decode_layers_bf16(
        ctypes.byref(stack.kernels),
        ctypes.byref(dims),
        weights,
        len(weights),
        out.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        slots.data_ptr(),
        tables.data_ptr(),
        lens.data_ptr(),
        x.shape[0],
        torch.get_num_threads(),
    )
    return out if status == 0 else None


@cache
def compiled_stack() -> Stack | None:
    """The compiled stack and the kernels it calls, or None where one of them does not run here."""
    parts = (
        bf16_rows.kernel_library(),
        fused_pointwise.rms_silu_library(),
        decode_attention.kernel_library(),
    )
    if any(part is None for part in parts):
        return None
    product, norm, attention = parts
    kernels = Kernels(
        _address(product.bf16_panels_product),
        _address(norm.rms_norm_bf16),
        _address(attention.paged_decode_attention_bf16),
    )
    library = native_build.checked_library(
        SOURCE,
        SIGNATURES,
        lambda library: agrees_with_reference(Stack(library, kernels)),
        "OVIS2_NATIVE_DECODE",
        "the compiled decode layers",
        cpu_has=native_build.has_avx2,
        flags=native_build.AVX2_FLAGS,
    )
    return Stack(library, kernels) if library is not None else None


def _address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


# ------------------------------------------------------------------------------------------- the reference
def reference_layer(weights: dict, x, cos, sin, k_cache, v_cache, meta: PagedAttentionMetadata, dims: Dims):
    """One decoder layer in PyTorch ops, each rounding to bf16 where the model's does, products and attention in
    float64 then rounded: x [seqs, hidden] after the layer; the caches written."""
    heads, kv_heads, dim = dims.heads, dims.kv_heads, dims.head_dim
    normed = fused_pointwise.reference_rms_norm(x, weights["input_norm"], dims.eps)
    qkv = _product(normed, weights["qkv"], weights["qkv_bias"]).view(-1, heads + 2 * kv_heads, dim)
    qk = apply_rotary(qkv[:, : heads + kv_heads], cos, sin)
    q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
    k_cache.view(-1, kv_heads, dim)[meta.slot_mapping] = k
    v_cache.view(-1, kv_heads, dim)[meta.slot_mapping] = v
    attended = decode_attention.reference(
        q.double(), k_cache.double(), v_cache.double(), meta.block_tables, meta.seq_lens
    ).to(x.dtype)
    x = x + _product(attended.flatten(1), weights["o"], weights["o_bias"])
    normed = fused_pointwise.reference_rms_norm(x, weights["post_norm"], dims.eps)
    gate, up = _product(normed, weights["gate_up"], weights["gate_up_bias"]).chunk(2, dim=-1)
    return x + _product(fused_pointwise.reference_silu_mul(gate, up), weights["down"], weights["down_bias"])


def _product(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double()).to(x.dtype)


@dataclass
class RandomCase:
    """A decode step over random layers: their weights (by `WEIGHTS` name), per-layer caches, the step's metadata,
    its input rows and RoPE's cos and sin."""

    layers: list[dict]
    caches: list[list[torch.Tensor]]
    meta: PagedAttentionMetadata
    x: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor]


def random_case(dims: Dims, lens: list[int], num_layers: int, seed: int) -> RandomCase:
    """Sequences of `lens` keys (the last one new) in shuffled blocks; dims.num_blocks and max_blocks must fit."""
    generator = torch.Generator().manual_seed(seed)

    def bf16(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=generator) * scale + offset).to(torch.bfloat16)

    hidden, inter, bs = dims.hidden, dims.intermediate, dims.block_size
    width = (dims.heads + 2 * dims.kv_heads) * dims.head_dim
    layers = [
        dict(
            input_norm=bf16(hidden, scale=0.1, offset=1.0),
            qkv=bf16(width, hidden, scale=hidden**-0.5 * 4),
            qkv_bias=bf16(width),
            o=bf16(hidden, dims.heads * dims.head_dim, scale=(dims.heads * dims.head_dim) ** -0.5),
            o_bias=None,
            post_norm=bf16(hidden, scale=0.1, offset=1.0),
            gate_up=bf16(2 * inter, hidden, scale=hidden**-0.5 * 2),
            gate_up_bias=None,
            down=bf16(hidden, inter, scale=inter**-0.5),
            down_bias=bf16(hidden, scale=0.1),
        )
        for _ in range(num_layers)
    ]
    cache_shape = (dims.num_blocks, bs, dims.kv_heads, dims.head_dim)
    caches = [[bf16(*cache_shape) for _ in range(2)] for _ in layers]
    order = torch.randperm(dims.num_blocks, generator=generator).tolist()
    tables = torch.zeros(len(lens), dims.max_blocks, dtype=torch.int64)
    for row, length in enumerate(lens):
        count = (length + bs - 1) // bs
        tables[row, :count] = torch.tensor(order[:count])
        order = order[count:]
    positions = torch.tensor(lens) - 1
    slots = tables.gather(1, (positions // bs)[:, None])[:, 0] * bs + positions % bs
    meta = PagedAttentionMetadata(
        slots, torch.arange(len(lens) + 1), torch.tensor(lens), tables, 1, max(lens), caches
    )
    frequencies = torch.rand(dims.head_dim // 2, generator=generator).double().repeat(2)
    angles = positions.double()[:, None] * frequencies
    rotary = (angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16))
    return RandomCase(layers, caches, meta, bf16(len(lens), hidden), rotary)


def reference_stack(case: RandomCase, dims: Dims) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """The case's output rows and caches by `reference_layer`, layer by layer (the case left as it was)."""
    x, caches = case.x, [[c.clone() for c in pair] for pair in case.caches]
    for weights, (k_cache, v_cache) in zip(case.layers, caches, strict=True):
        x = reference_layer(weights, x, *case.rotary, k_cache, v_cache, case.meta, dims)
    return x, caches


def computed_stack(stack: Stack, case: RandomCase, dims: Dims) -> torch.Tensor | None:
    """The case's output rows by the compiled stack (its caches written), or None where it refused."""
    table = (Layer * len(case.layers))()
    held = []  # the products' panels, alive through the call
    for entry, weights, pair in zip(table, case.layers, case.caches, strict=True):
        for name in WEIGHTS:
            tensor = weights[name]
            if tensor is not None and name in PRODUCTS:
                tensor = panels_of(tensor).data
                held.append(tensor)
            setattr(entry, name, None if tensor is None else tensor.data_ptr())
        entry.k_cache, entry.v_cache = (c.data_ptr() for c in pair)
    return _run(stack, dims, table, case.x, case.rotary, case.meta)


def agrees_with_reference(stack: Stack) -> bool:
    """Two layers over three sequences (5, 17 and 33 keys in shuffled blocks of 16; 6 query heads on 2 KV heads of
    16, hidden 40, intermediate 52: row tails past a multiple of 8): the output rows and the caches within 2^-6 of
    their largest value of the reference's (`reference_stack`)."""
    dims = Dims(40, 6, 2, 16, 52, 16, 8, 3, 1e-6, 16**-0.5)
    case = random_case(dims, [5, 17, 33], 2, seed=0)
    expected, expected_caches = reference_stack(case, dims)
    got = computed_stack(stack, case, dims)
    if got is None:
        return False
    written = [c for pair in case.caches for c in pair]
    wanted = [c for pair in expected_caches for c in pair]
    return all(close_to(a, b) for a, b in zip([got, *written], [expected, *wanted], strict=True))


def close_to(got: torch.Tensor, expected: torch.Tensor, steps: float = 2.0) -> bool:
    """Within `steps` bf16 steps (2^-7) of the expected's largest value."""
    scale = expected.double().abs().max()
    return bool((got.double() - expected.double()).abs().max() <= steps * 2**-7 * scale)
