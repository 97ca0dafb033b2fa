"""Offline batch inference: LLM(model=...).chat(conversations) / .generate(prompts), one result per input."""

from __future__ import annotations

import itertools

from .engine.engine_args import EngineArgs
from .engine.llm_engine import LLMEngine
from .engine.outputs import RequestOutput
from .engine.sampling_params import SamplingParams
from .errors import Ovis2Error
from .inputs import EngineInputs


class LLM:
    """Continuous batching without a server: every prompt is added, then the engine steps until all finish."""

    def __init__(
        self,
        model: str = "demo",
        compat: str = "ovis",
        dtype="auto",
        device: str = "auto",
        processor=None,
        **engine_args,
    ) -> None:
        self.args = EngineArgs(model=model, compat=compat, dtype=dtype, device=device, **engine_args)
        self.engine = LLMEngine(self.args, processor=processor)
        self._ids = itertools.count()

    @property
    def processor(self):
        return self.engine.processor

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def chat(
        self,
        conversations,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        max_patches: int | None = None,
    ) -> list[RequestOutput]:
        """conversations: one list of messages or a list of them; image parts carry PIL images."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        inputs = [
            self.engine.input_processor.chat_inputs(messages, max_patches) for messages in conversations
        ]
        return self.generate(inputs, sampling_params)

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """prompts: EngineInputs, token id lists or plain strings (tokenized without a chat template)."""
        if isinstance(prompts, (str, EngineInputs)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [self.engine.input_processor.prompt_inputs(p) for p in prompts]
        params = _per_prompt(sampling_params, len(prompts))
        request_ids = [f"offline-{next(self._ids)}" for _ in prompts]
        for inputs, p in zip(prompts, params, strict=True):
            self.engine.validate(inputs, p)  # fail before anything runs
        grammars = self._compile_grammars(params)
        try:
            for request_id, inputs, p, grammar in zip(request_ids, prompts, params, grammars, strict=True):
                self.engine.add_request(request_id, inputs, p, grammar=grammar)
            return self._run(request_ids)
        finally:
            for request_id in request_ids:
                self.engine.abort_request(request_id)

    def _compile_grammars(self, params: list[SamplingParams]) -> list:
        """Every structured constraint compiled, at once in the compiler's threads; the first bad one raises."""
        compiler = self.engine.input_processor.grammars if any(p.structured_outputs for p in params) else None
        futures = [compiler.submit(p.structured_outputs) if p.structured_outputs else None for p in params]
        return [future.result() if future is not None else None for future in futures]

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        while len(final) < len(request_ids):
            for output in self.engine.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[request_id] for request_id in request_ids]


def _per_prompt(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise Ovis2Error(f"{len(params)} sampling params for {count} prompts")
    return list(params)
