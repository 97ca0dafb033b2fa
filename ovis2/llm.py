"""Offline batch inference: LLM(model=...).chat(conversations) / .generate(prompts), one result per input."""

from __future__ import annotations

import itertools
import threading

from .engine.engine_args import EngineArgs
from .engine.llm_engine import LLMEngine
from .engine.outputs import RequestOutput
from .engine.sampling_params import SamplingParams
from .engine.scalars import is_integer
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
        self._lock = threading.Lock()

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
        if conversations and isinstance(conversations, list | tuple) and isinstance(conversations[0], dict):
            conversations = [conversations]
        _check_conversations(conversations)
        inputs = [
            self.engine.input_processor.chat_inputs(messages, max_patches) for messages in conversations
        ]
        return self.generate(inputs, sampling_params)

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """prompts: EngineInputs, token id lists, plain strings (tokenized without a chat template), vLLM's
        {"prompt": ...} or {"prompt_token_ids": ...}, or a list of those. One call at a time: a second thread's
        call waits for the first (both step the one engine)."""
        prompts = [self.engine.input_processor.prompt_inputs(p) for p in _prompt_list(prompts)]
        params = _per_prompt(sampling_params, len(prompts))
        with self._lock:
            request_ids = [f"offline-{next(self._ids)}" for _ in prompts]
            for inputs, p in zip(prompts, params, strict=True):
                self.engine.validate(inputs, p)  # fail before anything runs
            grammars = self._compile_grammars(params)
            try:
                for request_id, inputs, p, grammar in zip(
                    request_ids, prompts, params, grammars, strict=True
                ):
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
            assert self.engine.has_unfinished_requests, "the engine went idle with requests unanswered"
            for output in self.engine.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[request_id] for request_id in request_ids]


def _prompt_list(prompts) -> list:
    if isinstance(prompts, str | EngineInputs | dict):
        return [prompts]
    if isinstance(prompts, list | tuple):
        return [prompts] if prompts and is_integer(prompts[0]) else list(prompts)
    raise Ovis2Error(
        "prompts must be a string, a list of token ids, EngineInputs, a dict with 'prompt' or 'prompt_token_ids', "
        f"or a list of those; got {type(prompts).__name__}"
    )


def _check_conversations(conversations) -> None:
    if not isinstance(conversations, list | tuple) or not all(
        isinstance(messages, list | tuple) and all(isinstance(m, dict) for m in messages)
        for messages in conversations
    ):
        raise Ovis2Error(
            "conversations must be a list of messages ({'role': ..., 'content': ...}) or a list of such lists"
        )
    for messages in conversations:
        for message in messages:
            if not isinstance(message.get("content"), str | list | tuple | None):
                raise Ovis2Error("message content must be a string or a list of parts")


def _per_prompt(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if not isinstance(params, list | tuple) or not all(isinstance(p, SamplingParams) for p in params):
        raise Ovis2Error("sampling_params must be a SamplingParams or a list of them, one per prompt")
    if len(params) != count:
        raise Ovis2Error(f"{len(params)} sampling params for {count} prompts")
    return list(params)
