"""Runs one scheduled step on the model: flat batch tensors in, logits of the sampled rows out.

Owns the KV pool (one (K, V) pair of [num_blocks, block_size, kv_heads, head_dim] per layer) and the
visual side (visual_embeddings.py: the vision tower and the cache of its embeddings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..host_memory import check_fits
from ..image_layout import IMAGE_TOKEN_IDS
from ..layers import PagedAttentionMetadata
from .block_tables import padded_block_tables, slot_of
from .core_outputs import RawLogprob
from .decode_graphs import DecodeGraphs
from .partial_blocks import SlotCopy
from .prompt_logprobs import prompt_logprobs
from .scheduler import ScheduledSeq
from .sequence import SequenceGroup
from .visual_embeddings import VisualEmbeddings

CUDA_ACTIVATION_RESERVE = 2 * 1024**3


def kv_bytes_per_block(num_layers: int, block_shape: tuple[int, int, int], dtype: torch.dtype) -> int:
    """2 (K and V) * layers * block_size * kv_heads * head_dim * dtype size."""
    return 2 * num_layers * math.prod(block_shape) * torch.empty((), dtype=dtype).element_size()


def kv_pool_budget(args, device: torch.device) -> int:
    """Bytes for the KV pool: the explicit budget, else a fraction of free GPU memory, else the CPU default."""
    if args.kv_cache_memory is not None:
        return args.kv_cache_memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, int(free * args.gpu_memory_utilization) - CUDA_ACTIVATION_RESERVE)
    return args.cpu_kv_cache_memory


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    image_embeds: torch.Tensor | None  # [atoms in this batch, H]
    atom_index: torch.Tensor  # [atoms in this batch]: their flat positions in input_ids
    meta: PagedAttentionMetadata
    sample_index: torch.Tensor  # [S]: flat index of each sampled row's last token


@dataclass
class StepLogits:
    """What one step's forward passes give the sampler and the prompt logprobs."""

    sampled: torch.Tensor | None  # [S, V] fp32 logits of the items that sample, in scheduled order
    prompt_logprobs: dict[int, list[RawLogprob | None]]  # by id() of each item computing prompt logprobs


class ModelRunner:
    def __init__(self, model, args) -> None:
        self.model = model
        self.compat = getattr(model, "compat", args.compat)
        self.device = model.device
        self.block_size = args.block_size
        self.visual = VisualEmbeddings(model, self.compat, args.visual_cache_size)
        block_shape = model.kv_cache_block_shape(self.block_size)
        self.bytes_per_block = kv_bytes_per_block(model.num_kv_layers, block_shape, model.dtype)
        self.num_blocks = kv_pool_budget(args, self.device) // self.bytes_per_block  # the block manager's
        self.scratch_block = self.num_blocks  # one more, owned by no sequence: padded decode rows write here
        self.decode_graphs: DecodeGraphs | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.vocab_size = model.config.vocab_size
        self.banned_ids = torch.tensor(
            sorted(t for t in IMAGE_TOKEN_IDS if t < self.vocab_size), device=self.device
        )

    def allocate_kv_cache(self) -> None:
        shape = (self.num_blocks + 1, *self.model.kv_cache_block_shape(self.block_size))
        dtype = self.model.dtype
        if self.device.type == "cpu":
            needed = (self.num_blocks + 1) * self.bytes_per_block
            check_fits(needed, "the KV cache", "lower kv_cache_memory (--kv-cache-memory)")
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=dtype, device=self.device),
                torch.zeros(shape, dtype=dtype, device=self.device),
            )
            for _ in range(self.model.num_kv_layers)
        ]

    @torch.inference_mode()
    def copy_kv_slots(self, copies: list[SlotCopy]) -> None:
        """Every layer's K and V of each copy's source slots into its target slots (partial prefix hits).
        All sources are read before any target is written."""
        if not copies:
            return
        bs = self.block_size
        source = self._tensor([c.source * bs + i for c in copies for i in range(c.num_slots)])
        target = self._tensor([c.target * bs + i for c in copies for i in range(c.num_slots)])
        for pair in self.kv_caches:
            for pool in pair:
                flat = pool.view(-1, *pool.shape[2:])  # [slots, kv_heads, head_dim]
                flat.index_copy_(0, target, flat.index_select(0, source))

    def enable_decode_graphs(self, max_model_len: int, capture: bool) -> None:
        """Plain decode steps run on fixed shapes (decode_graphs.py), captured as CUDA graphs when `capture`."""
        self.decode_graphs = DecodeGraphs(self, max_model_len, capture)

    # --- the forward pass
    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> StepLogits:
        """Runs the scheduled tokens: the logits of the items that sample, and the prompt logprobs of the items
        computing them.

        Decodes run together; each prefill chunk runs as its own forward, so one long chunk does not pad
        every decode row of the batch up to its length in attention.
        """
        parts = split_by_query_len(scheduled)
        found: dict[int, list[RawLogprob | None]] = {}
        hidden = [h for h in (self._forward(part, found) for part in parts) if h is not None]
        if not hidden:
            return StepLogits(None, found)
        hidden = torch.cat(hidden)  # [S, H] in part order
        part_order = [id(item) for part in parts for item in part if item.samples]
        wanted = [id(item) for item in scheduled if item.samples]
        if part_order != wanted:
            position = {key: index for index, key in enumerate(part_order)}
            hidden = hidden[torch.tensor([position[key] for key in wanted], device=hidden.device)]
        return StepLogits(self.logits(hidden), found)  # [S, V] in scheduled order

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] fp32 logits, the image placeholder ids masked: they are never generated."""
        logits = self.model.compute_logits(hidden)
        if self.banned_ids.numel():
            logits.index_fill_(1, self.banned_ids, float("-inf"))
        return logits

    def _forward(
        self, scheduled: list[ScheduledSeq], found: dict[int, list[RawLogprob | None]]
    ) -> torch.Tensor | None:
        """Hidden states [S_part, H] of this part's sampled rows; the prompt logprobs its items compute go into
        `found`."""
        bucket = self.decode_graphs.bucket_for(scheduled) if self.decode_graphs is not None else None
        hidden = (
            self.decode_graphs.run(scheduled, bucket) if bucket is not None else None
        )  # [len(scheduled), H]
        if hidden is not None:
            rows = [i for i, item in enumerate(scheduled) if item.samples]
            return hidden if len(rows) == len(scheduled) else hidden[self._tensor(rows)]
        inputs = self.build_inputs(scheduled)
        embeds = self.model.embed_multimodal(
            inputs.input_ids, inputs.image_embeds, inputs.atom_index
        )  # [T, H]
        hidden = self.model.forward_paged(embeds, inputs.positions, inputs.meta)  # [T, H]
        self._add_prompt_logprobs(scheduled, hidden, found)
        return hidden[inputs.sample_index] if inputs.sample_index.numel() else None

    def _add_prompt_logprobs(
        self, scheduled: list[ScheduledSeq], hidden: torch.Tensor, found: dict[int, list[RawLogprob | None]]
    ) -> None:
        """hidden: [T, H], the items' tokens one after another."""
        offset = 0
        for item in scheduled:
            positions = item.prompt_logprob_positions
            if positions:
                rows = hidden[offset + positions.start - item.start : offset + positions.stop - item.start]
                targets = item.seq.token_ids[positions.start + 1 : positions.stop + 1]
                k = item.seq.params.prompt_logprobs
                found[id(item)] = prompt_logprobs(self.logits, rows, targets, k, self.vocab_size)
            offset += item.num_tokens

    def build_inputs(self, scheduled: list[ScheduledSeq]) -> ModelInputs:
        bs = self.block_size
        input_ids, positions, slots, image_parts, atom_index = [], [], [], [], []
        query_start, seq_lens, sample_index = [0], [], []
        for item in scheduled:
            seq, start, end = item.seq, item.start, item.end
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(slot_of(table, p, bs) for p in range(start, end))
            query_start.append(query_start[-1] + item.num_tokens)
            seq_lens.append(end)
            if item.samples:
                sample_index.append(query_start[-1] - 1)
            atoms = _atoms_in(seq.group, start, end)
            if atoms is not None:
                atom_positions, embeds = atoms
                image_parts.append(embeds)
                offset = query_start[-2] - start
                atom_index.extend(offset + p for p in atom_positions)
        max_blocks = max(len(item.seq.block_table) for item in scheduled)
        tables = padded_block_tables(
            [item.seq.block_table for item in scheduled], len(scheduled), max_blocks, 0
        )
        meta = PagedAttentionMetadata(
            slot_mapping=self._tensor(slots),
            query_start_loc=self._tensor(query_start),
            seq_lens=self._tensor(seq_lens),
            block_tables=self._to_device(tables),
            max_query_len=max(item.num_tokens for item in scheduled),
            max_seq_len=max(seq_lens),
            kv_caches=self.kv_caches,
            starts_at_zero=all(item.start == 0 for item in scheduled),
        )
        return ModelInputs(
            input_ids=self._tensor(input_ids),
            positions=self._tensor(positions),
            image_embeds=torch.cat(image_parts) if image_parts else None,
            atom_index=self._tensor(atom_index),
            meta=meta,
            sample_index=self._tensor(sample_index),
        )

    def _tensor(self, values) -> torch.Tensor:
        return self._to_device(torch.tensor(values, dtype=torch.long))

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor


def split_by_query_len(scheduled: list[ScheduledSeq], max_waste: float = 1.25) -> list[list[ScheduledSeq]]:
    """Forward passes for one step: every single-token item together, then prefill chunks grouped by length
    so that padding each group to its longest chunk costs at most `max_waste` times its real tokens."""
    singles = [item for item in scheduled if item.num_tokens == 1]
    parts = [singles] if singles else []
    group: list[ScheduledSeq] = []
    for item in sorted((i for i in scheduled if i.num_tokens > 1), key=lambda i: i.num_tokens):
        total = sum(i.num_tokens for i in group) + item.num_tokens
        if group and (len(group) + 1) * item.num_tokens > max_waste * total:
            parts.append(group)
            group = []
        group.append(item)
    return parts + ([group] if group else [])


def _atoms_in(group: SequenceGroup, start: int, end: int) -> tuple[list[int], torch.Tensor] | None:
    """The prompt positions of the image atoms in [start, end) and their image embeddings, or None if none."""
    first, last = group.atoms_before(start), group.atoms_before(end)
    if first == last:
        return None
    return group.atom_positions[first:last], group.image_embeds.atoms(first, last)
