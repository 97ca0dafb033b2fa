"""The synchronous engine: input processing -> core -> output processing, one step at a time.

`add_request` validates and hands the request to the core; `step` runs one core step and turns its token ids
into RequestOutputs (ending in the core the choices whose stop strings matched); `abort_request` stops one.
"""

from __future__ import annotations

from ..dtypes import dtype_name
from ..errors import Ovis2Error
from ..inputs import EngineInputs
from .core import EngineCore
from .engine_args import EngineArgs
from .engine_stats import EngineStats
from .input_processor import InputProcessor
from .output_processor import OutputProcessor
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .structured.grammar import Grammar


class LLMEngine:
    def __init__(self, args: EngineArgs, model=None, tokenizer=None, processor=None, grammars=None) -> None:
        self.args = args
        self.core = EngineCore(args, model)
        self.input_processor = InputProcessor(
            args, self.core.vocab_size, self.core.max_model_len, tokenizer, processor, grammars
        )
        self.output_processor = OutputProcessor(self.input_processor.tokenizer)

    @property
    def tokenizer(self):
        return self.input_processor.tokenizer

    @property
    def processor(self):
        return self.input_processor.processor

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def dtype_name(self) -> str:
        """The weights' dtype as resolved (`auto` depends on the device and the CPU): "bfloat16", "float32", ..."""
        return dtype_name(self.core.model.dtype)

    @property
    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests

    @property
    def stats(self) -> EngineStats:
        stats, grammars = self.core.stats, self.input_processor.grammar_stats
        stats.num_grammar_compiles, stats.grammar_compile_seconds = (
            grammars.num_compiles,
            grammars.compile_seconds,
        )
        stats.num_grammar_cache_hits = grammars.num_cache_hits
        return stats

    def validate(self, inputs: EngineInputs, params: SamplingParams) -> None:
        self.input_processor.validate(inputs, params)

    def add_request(
        self,
        request_id: str,
        inputs: EngineInputs,
        params: SamplingParams,
        arrival_time: float | None = None,
        grammar: Grammar | None = None,
    ) -> None:
        """`grammar`: the compiled params.structured_outputs, when the caller compiled it (else compiled here)."""
        if request_id in self.core.groups:
            raise Ovis2Error(f"request id {request_id!r} is already running")
        request = self.input_processor.make_request(request_id, inputs, params, arrival_time, grammar)
        group = self.core.add_request(request)
        self.output_processor.add_request(
            request_id, inputs.prompt_token_ids, inputs.num_image_tokens, params, group.metrics
        )

    def step(self) -> list[RequestOutput]:
        processed = self.output_processor.process(self.core.step())
        for request_id, index in processed.stopped:
            self.core.finish_choice(request_id, index)
        for request_id in processed.failed:
            self.core.abort_request(request_id)
        return processed.outputs

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its last output (finish_reason "abort")."""
        group = self.core.abort_request(request_id)
        cached = group.seqs[0].num_cached_tokens if group is not None else None
        return self.output_processor.finish_request(request_id, "abort", num_cached_tokens=cached)
