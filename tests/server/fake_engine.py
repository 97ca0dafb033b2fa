"""A fake AsyncEngine (docs/CONTRACTS.md interface) for fast protocol tests: no model, scripted outputs."""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass, field

import torch

from ovis2 import EngineDeadError, EngineInputs, EngineOverloadedError, ImageInput, Ovis2Error
from ovis2.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from ovis2.image_layout import placeholder_ids, token_count
from ovis2.tokenizer import IM_END_ID, IM_START_ID

WORDS = ["Hello", " there", ",", " I", " see", " a", " cat", " on", " the", " mat", "."]


@dataclass
class FakeStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0


class FakeProcessor:
    """Renders messages like the real template; each image and each video frame costs one crop (259 tokens)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls: list[tuple[list[dict], int | None]] = []
        self.videos: list[list[list]] = []  # per prepare_chat call, copies of each video part's frames

    def _text(self, text: str) -> list[int]:  # literal control tokens stay text
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def prepare_chat(self, messages: list[dict], max_patches: int | None = None) -> EngineInputs:
        self.calls.append((messages, max_patches))
        self.videos.append(
            [[frame.copy() for frame in part["video"]] for part in _parts_of(messages, "video")]
        )
        ids, parts = self._render(messages)
        images = [
            ImageInput(
                torch.zeros(1, 3, 1, 1), (1, 1), f"fake-{part['image'].size}", part.get("video_frame", False)
            )
            for part in parts
        ]
        return EngineInputs(prompt_token_ids=ids, images=images)

    def chat_token_ids(self, messages: list[dict], max_patches: int | None = None) -> tuple[list[int], int]:
        self.calls.append((messages, max_patches))
        ids, parts = self._render(messages)
        return ids, len(parts) * token_count((1, 1))

    def _render(self, messages: list[dict]) -> tuple[list[int], list[dict]]:
        ids, image_parts = [], []
        for message in messages:
            ids += [IM_START_ID, *self._text(message["role"] + "\n")]
            parts = (
                message["content"]
                if isinstance(message["content"], list)
                else [{"type": "text", "text": message["content"]}]
            )
            for part in _with_frames(parts):
                if part["type"] == "image":
                    ids += placeholder_ids((1, 1))
                    image_parts.append(part)
                else:
                    ids += self._text(part["text"])
            ids += [IM_END_ID, *self._text("\n")]
        ids += [IM_START_ID, *self._text("assistant\n")]
        return ids, image_parts

    def image_token_count(self, width: int, height: int, max_patches: int | None = None) -> int:
        return token_count((1, 1))


def _parts_of(messages: list[dict], kind: str) -> list[dict]:
    return [p for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == kind]


def _with_frames(parts: list[dict]) -> list[dict]:
    """Video parts as their frames' image parts: the frames given (`video`) or `num_frames` of them."""
    expanded = []
    for part in parts:
        if part["type"] != "video":
            expanded.append(part)
            continue
        frames = part.get("video") or [None] * part["num_frames"]
        expanded += [{"type": "image", "image": frame, "video_frame": True} for frame in frames]
    return expanded


@dataclass
class FakeEngine:
    tokenizer: object
    max_model_len: int = 4096
    dtype_name: str = "float32"
    model_name: str = "fake-model"
    words: list[str] = field(default_factory=lambda: list(WORDS))  # the answer, one token each; then EOS
    step_delay: float = 0.0
    late_suffix: str | None = (
        None  # requests whose id ends with it wait `late_delay` before their first output
    )
    late_delay: float = 0.0
    overloaded: bool = False
    dead: bool = False
    fail_with: str | None = None  # an engine-side error for every request
    fail_from_step: int = 0  # ...starting at this output (0: the first)
    fail_as_users: bool = False  # ...flagged as the request's own fault (RequestOutput.user_error)
    crash_with: Exception | None = None  # an exception raised from generate()
    crash_mid_stream: Exception | None = None  # ...raised instead of the output of step `fail_from_step`
    num_total_blocks: int = 64
    preemptions: int = 0  # what stats report as num_preemptions
    started: bool = False
    stopped: bool = False
    requests: dict = field(default_factory=dict)  # request_id -> (inputs, params)
    running: set = field(default_factory=set)
    aborted: list = field(default_factory=list)
    idle_hook_requests: int = 0
    finished: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.processor = FakeProcessor(self.tokenizer)

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.stopped = True

    def set_idle_hook(self, hook, quiet_seconds: float = 0.0) -> None:
        self.idle_hook = hook  # no loop thread here: never called

    def request_idle_hook(self) -> None:
        self.idle_hook_requests += 1

    def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("the fake loop died")

    @property
    def stats(self) -> FakeStats:
        used = 4 * len(self.running)
        return FakeStats(
            len(self.running),
            0,
            self.num_total_blocks - used,
            self.num_total_blocks,
            used / self.num_total_blocks,
            num_preemptions=self.preemptions,
        )

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.aborted.append(request_id)
            self.running.discard(request_id)

    def _choice_words(self, params, index: int) -> list[str]:
        if params.seed is None and params.temperature == 0.0:
            return self.words
        rng = random.Random(params.seed if params.seed is not None else random.random())
        rng = random.Random(rng.random() + index)
        return [rng.choice(WORDS) for _ in self.words]

    def check_capacity(self) -> None:
        if self.overloaded:
            raise EngineOverloadedError("full")

    def _prompt_logprobs(self, ids: list[int], k: int | None) -> list[TokenLogprob | None] | None:
        """Scripted: prompt token p's logprob is -p / 10, its rank k + p; the top k are t0, t1, ... (ids 100, 101,
        ...) at -2, -3, ..."""
        if k is None:
            return None
        entries = [None]
        for p, token_id in enumerate(ids[1:], start=1):
            text = self.tokenizer.decode([token_id])
            top = [TokenLogprob(100 + i, f"t{i}", -2.0 - i, [], list(f"t{i}".encode())) for i in range(k)]
            entries.append(TokenLogprob(token_id, text, -p / 10, top, list(text.encode()), rank=k + p))
        return entries

    async def generate(self, inputs: EngineInputs, params, request_id: str):
        self.check_health()
        self.check_capacity()
        if len(inputs.prompt_token_ids) >= self.max_model_len:
            raise Ovis2Error("the prompt is too long")
        if self.crash_with is not None:
            raise self.crash_with
        self.requests[request_id] = (inputs, params)
        self.running.add(request_id)
        choices = [_Choice(i, self._choice_words(params, i)) for i in range(params.n)]
        try:
            if self.late_suffix is not None and request_id.endswith(self.late_suffix):
                await asyncio.sleep(self.late_delay)
            for step in itertools.count():
                await asyncio.sleep(self.step_delay)
                if request_id not in self.running:
                    return
                if self.crash_mid_stream is not None and step >= self.fail_from_step:
                    raise self.crash_mid_stream
                outputs = [c.step(self.tokenizer, params) for c in choices]
                output = RequestOutput(
                    request_id,
                    list(inputs.prompt_token_ids),
                    outputs,
                    num_image_tokens=inputs.num_image_tokens,
                    prompt_logprobs=self._prompt_logprobs(inputs.prompt_token_ids, params.prompt_logprobs),
                )
                if self.fail_with is not None and step >= self.fail_from_step:
                    output.error, output.user_error = self.fail_with, self.fail_as_users
                    for o in outputs:
                        o.finish_reason = "error"
                yield output
                if output.finished:
                    self.finished.append(request_id)
                    return
        finally:
            if request_id in self.running:
                self.running.discard(request_id)
                if request_id not in self.finished:
                    self.aborted.append(request_id)


@dataclass
class _Choice:
    index: int
    words: list[str]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    output_kind: str = "cumulative"

    def step(self, tokenizer, params) -> CompletionOutput:
        self.output_kind = params.output_kind
        if self.finish_reason is not None:
            return self._output("", [], [])
        position = len(self.token_ids)
        if position >= len(self.words) and not params.ignore_eos:
            self.finish_reason = "stop"
            return self._output("", [], [])
        word = self.words[position % len(self.words)]
        token_id = tokenizer.encode(word, add_special_tokens=False)[0]
        self.token_ids.append(token_id)
        delta = word
        for stop in params.stop:
            if stop in self.text + word:
                cut = (self.text + word).index(stop)
                delta = (self.text + word)[len(self.text) : cut]
                self.finish_reason = "stop"
        self.text += delta
        lps = []
        if params.logprobs is not None:
            top = [(token_id, word, -0.25)] + [(i, f"t{i}", -2.0 - i) for i in range(params.logprobs)]
            top = [
                TokenLogprob(i, text, lp, [], list(text.encode())) for i, text, lp in top[: params.logprobs]
            ]
            lps = [TokenLogprob(token_id, word, -0.25, top, list(word.encode()))]
            self.logprobs += lps
        if self.finish_reason is None and len(self.token_ids) >= params.max_tokens:
            self.finish_reason = "length"
        return self._output(delta, [token_id], lps)

    def _output(self, delta: str, delta_ids: list[int], delta_logprobs: list) -> CompletionOutput:
        whole = self.finish_reason is not None or self.output_kind == "cumulative"  # the engine's contract
        return CompletionOutput(
            index=self.index,
            text=self.text if whole else "",
            token_ids=list(self.token_ids) if whole else [],
            delta_text=delta,
            delta_token_ids=delta_ids,
            logprobs=list(self.logprobs) if whole else [],
            delta_logprobs=delta_logprobs,
            finish_reason=self.finish_reason,
            stop_reason=None,
        )
