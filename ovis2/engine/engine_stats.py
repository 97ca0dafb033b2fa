"""What the engine reports of itself: queue sizes, KV cache use and its counters since start."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float  # 0..1, blocks referenced by some sequence
    num_encoded_images: int = 0
    num_prompt_tokens: int = 0  # computed (not cached) prompt tokens so far
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache so far
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_grammar_compiles: int = 0  # structured outputs: grammars compiled, their total seconds, cache hits
    grammar_compile_seconds: float = 0.0
    num_grammar_cache_hits: int = 0
