"""Decode steps on fixed shapes, replayed as CUDA graphs.

A step of B decoding sequences runs as a batch of the next bucket size, with block tables as wide as the next
context bucket; padded rows write their K/V into a scratch block no sequence owns, and their outputs are
dropped. On CUDA each (batch, context) bucket is captured as a CUDA graph the first time a step needs it;
later steps copy their inputs into its static tensors and replay it, one launch instead of dozens per layer.
This relies on the model's paged forward never waiting on the device (tests/engine/test_host_syncs.py).
Without capture (CPU, tests) the same fixed-shape forward runs eagerly.

Steps the buckets do not cover (prefill chunks, image atoms, more rows or longer contexts than
MAX_TOKEN_SLOTS allows) run on the runner's eager path.
"""

from __future__ import annotations

import logging

import torch

from ..layers import PagedAttentionMetadata
from .block_tables import padded_block_tables, slot_of
from .scheduler import ScheduledSeq

logger = logging.getLogger(__name__)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_CONTEXT_BLOCKS = 16
# batch x context tokens of the largest bucket: bounds the K/V each layer gathers inside a graph
# (262144 slots of Ovis2-2B's 2 KV heads x 128 dims in bf16: 256 MB for K and V together).
MAX_TOKEN_SLOTS = 262_144


def next_bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= value), None)


def context_buckets(max_blocks: int) -> tuple[int, ...]:
    """Block-table widths: powers of two from MIN_CONTEXT_BLOCKS, the last one max_blocks."""
    widths, width = [], MIN_CONTEXT_BLOCKS
    while width < max_blocks:
        widths.append(width)
        width *= 2
    return (*widths, max_blocks)


class FixedDecode:
    """One (batch, blocks) bucket: static input tensors, the forward over them, and its graph once captured."""

    def __init__(
        self, model, kv_caches, block_size: int, scratch_block: int, batch: int, blocks: int
    ) -> None:
        device = model.device
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.batch, self.blocks, self.scratch_block = batch, blocks, scratch_block
        self.input_ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((batch,), scratch_block * block_size, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(batch, dtype=torch.long, device=device)
        self.block_tables = torch.full((batch, blocks), scratch_block, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.long, device=device)
        self.no_atoms = torch.zeros(0, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None  # the graph's output, [batch, H]

    def forward(self) -> torch.Tensor:
        """[batch, H] hidden states of the rows in the static tensors (a fresh layout each call)."""
        meta = PagedAttentionMetadata(
            slot_mapping=self.slot_mapping,
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            max_query_len=1,
            max_seq_len=self.blocks * self.block_size,
            kv_caches=self.kv_caches,
        )
        embeds = self.model.embed_multimodal(self.input_ids, None, self.no_atoms)
        return self.model.forward_paged(embeds, self.positions, meta)

    def capture(self, pool) -> None:
        """Record the forward as a CUDA graph. The static tensors hold padding rows: warm-up and capture write
        K/V only into the scratch block."""
        with torch.cuda.device(self.input_ids.device):  # the engine thread's current device may be another
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.forward()  # first calls initialise kernels and workspaces, which must not happen in capture
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.hidden = self.forward()

    def run(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """[len(scheduled), H] hidden states of these decodes."""
        self._load(scheduled)
        if self.graph is None:
            return self.forward()[: len(scheduled)]
        with torch.cuda.device(self.input_ids.device):
            self.graph.replay()
        return self.hidden[: len(scheduled)]

    def _load(self, scheduled: list[ScheduledSeq]) -> None:
        bs, scratch, padding = self.block_size, self.scratch_block, self.batch - len(scheduled)
        ids, positions, slots, seq_lens = [], [], [], []
        for item in scheduled:
            seq, position = item.seq, item.start
            ids.append(seq.token_ids[position])
            positions.append(position)
            slots.append(slot_of(seq.block_table, position, bs))
            seq_lens.append(position + 1)
        ids += [0] * padding
        positions += [0] * padding
        slots += [scratch * bs] * padding
        seq_lens += [1] * padding
        tables = padded_block_tables(
            [item.seq.block_table for item in scheduled], self.batch, self.blocks, scratch
        )
        for static, values in (
            (self.input_ids, ids),
            (self.positions, positions),
            (self.slot_mapping, slots),
            (self.seq_lens, seq_lens),
            (self.block_tables, tables),
        ):
            source = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
            if static.device.type == "cuda":
                source = source.pin_memory()
            static.copy_(source, non_blocking=True)


class DecodeGraphs:
    """The fixed-shape decode buckets of one model runner, built (and on CUDA captured) on first use."""

    def __init__(self, runner, max_model_len: int, capture: bool) -> None:
        self.runner = runner
        self.capture = capture
        self.context_buckets = context_buckets(-(-max_model_len // runner.block_size))
        self.buckets: dict[tuple[int, int], FixedDecode] = {}
        self.failed: set[tuple[int, int]] = set()  # buckets whose capture failed: those steps run eagerly
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def bucket_for(self, scheduled: list[ScheduledSeq]) -> tuple[int, int] | None:
        """The (batch, blocks) bucket that runs this step, or None when the step is not a plain decode step
        within the buckets."""
        if not all(item.num_tokens == 1 and item.start >= item.seq.prompt_len for item in scheduled):
            return None
        batch = next_bucket(len(scheduled), BATCH_BUCKETS)
        blocks = next_bucket(max(len(item.seq.block_table) for item in scheduled), self.context_buckets)
        if batch is None or blocks is None or batch * blocks * self.runner.block_size > MAX_TOKEN_SLOTS:
            return None
        return None if (batch, blocks) in self.failed else (batch, blocks)

    def run(self, scheduled: list[ScheduledSeq], bucket: tuple[int, int]) -> torch.Tensor | None:
        """Hidden states [len(scheduled), H], or None when this bucket's graph cannot be captured (the caller
        then runs the step eagerly, as it will every later step of this bucket)."""
        fixed = self.buckets.get(bucket)
        if fixed is None:
            runner = self.runner
            fixed = FixedDecode(
                runner.model, runner.kv_caches, runner.block_size, runner.scratch_block, *bucket
            )
            if self.capture:
                try:
                    fixed.capture(self.pool)
                except Exception:  # noqa: BLE001 - out of memory, an op capture does not allow: stay eager
                    logger.exception(
                        "capturing the decode graph for (batch, blocks) %s failed; running eagerly", bucket
                    )
                    self.failed.add(bucket)
                    return None
            self.buckets[bucket] = fixed
        return fixed.run(scheduled)
