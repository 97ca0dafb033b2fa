"""Input processing: the processor and tokenizer, request validation, and a conversation, token ids or
EngineInputs turned into an EngineRequest (its image spans known) for the core."""

from __future__ import annotations

from collections.abc import Sequence

from .. import image_layout
from ..errors import Ovis2Error
from ..inputs import EngineInputs
from ..tokenizer import DEFAULT_EOS_IDS, IMAGE_ATOM_ID
from .engine_args import EngineArgs
from .request import EngineRequest
from .sampling_params import SamplingParams
from .structured.compiler import GrammarCompiler, GrammarStats
from .structured.grammar import Grammar


def load_tokenizer(args: EngineArgs):
    from transformers import AutoTokenizer

    from ..checkpoint import resolve_checkpoint

    return AutoTokenizer.from_pretrained(str(resolve_checkpoint(args.model)))


def load_processor(args: EngineArgs):
    """The checkpoint's processor with the engine's compat, backend and tile cap (its default max_patches)."""
    from ..processing import Ovis2Processor

    tile_cap = {} if args.max_tiles_per_image is None else {"max_patches": args.max_tiles_per_image}
    return Ovis2Processor.from_pretrained(args.model, compat=args.compat, use_fast=args.image_processor == "fast",
                                          **tile_cap)  # fmt: skip


class InputProcessor:
    def __init__(self, args: EngineArgs, vocab_size: int, max_model_len: int, tokenizer=None, processor=None,
                 grammars: GrammarCompiler | None = None):  # fmt: skip
        self.args = args
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self._tokenizer = tokenizer
        self._processor = processor
        self._grammars = grammars
        self._owns_grammars = grammars is None  # a compiler handed in (shared by engines) is not closed here

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.args)
        return self._tokenizer

    @property
    def processor(self):
        if self._processor is None:
            self._processor = load_processor(self.args)
        return self._processor

    @property
    def grammars(self) -> GrammarCompiler:
        """Compiles structured-output constraints against this tokenizer, over the model's whole vocabulary."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, DEFAULT_EOS_IDS,
                                             self.args.grammar_cache_size)  # fmt: skip
        return self._grammars

    def close(self) -> None:
        """Stop the threads of the grammar compiler this built (a compile under way finishes on its own)."""
        if self._grammars is not None and self._owns_grammars:
            self._grammars.close()

    @property
    def grammar_stats(self) -> GrammarStats:
        return self._grammars.stats if self._grammars is not None else GrammarStats()

    @property
    def max_tiles_per_image(self) -> int:
        """The most tiles an image may be cut into: the engine's setting, else the compat's default."""
        if self.args.max_tiles_per_image is not None:
            return self.args.max_tiles_per_image
        return self.processor.image_processor.resolve_patches()[0]

    # --- prompts -> EngineInputs
    def chat_inputs(self, messages, max_patches: int | None = None) -> EngineInputs:
        """Messages whose image parts carry images; `max_patches` (and a part's own) may lower the tile cap."""
        cap = self.max_tiles_per_image
        asked = [max_patches] + [part.get("max_patches") for part in _image_parts(messages)]
        for value in asked:
            if value is not None and not 1 <= value <= cap:
                raise Ovis2Error(f"max_patches is {value}; this engine allows 1 to {cap} tiles per image")
        return self.processor.prepare_chat(messages, max_patches=max_patches if max_patches is not None else cap)

    def prompt_inputs(self, prompt) -> EngineInputs:
        """EngineInputs as they are, a list of token ids, or a string (tokenized without a chat template)."""
        if isinstance(prompt, EngineInputs):
            return prompt
        if isinstance(prompt, str):
            return EngineInputs(self.tokenizer.encode(prompt, add_special_tokens=False))
        if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return EngineInputs(list(prompt))
        raise Ovis2Error("a prompt must be EngineInputs, a list of token ids or a string")

    # --- EngineInputs -> EngineRequest
    def make_request(self, request_id: str, inputs: EngineInputs, params: SamplingParams,
                     arrival_time: float | None = None, grammar: Grammar | None = None) -> EngineRequest:  # fmt: skip
        """`grammar`: params.structured_outputs compiled already (`grammars.submit`); else it is compiled here,
        blocking (offline use only: the async engine compiles before a request reaches the loop)."""
        self.validate(inputs, params)
        if grammar is None and params.structured_outputs is not None:
            grammar = self.grammars.compile(params.structured_outputs)
        return EngineRequest.build(request_id, inputs, params, arrival_time, grammar)

    def validate(self, inputs: EngineInputs, params: SamplingParams) -> None:
        """Raise Ovis2Error for a request the engine cannot serve (nothing is queued yet)."""
        params.validate()
        ids = inputs.prompt_token_ids
        if not ids:
            raise Ovis2Error("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise Ovis2Error(f"the prompt has {len(ids)} tokens; this model serves at most "
                             f"{self.max_model_len - 1} prompt tokens (max_model_len {self.max_model_len})")  # fmt: skip
        if max(ids) >= self.vocab_size or min(ids) < 0:
            raise Ovis2Error("the prompt holds token ids outside the vocabulary")
        self._validate_images(inputs)

    def _validate_images(self, inputs: EngineInputs) -> None:
        if len(inputs.images) > self.args.max_images_per_request:
            raise Ovis2Error(f"{len(inputs.images)} images in one request; at most "
                             f"{self.args.max_images_per_request} are allowed")  # fmt: skip
        for image in inputs.images:
            if image.num_crops != image_layout.crop_count(image.grid):
                raise Ovis2Error(f"an image with grid {image.grid} needs {image_layout.crop_count(image.grid)} "
                                 f"crops, not {image.num_crops}")  # fmt: skip
        num_atoms = sum(1 for t in inputs.prompt_token_ids if t == IMAGE_ATOM_ID)
        num_embeds = sum(image.num_atoms for image in inputs.images)
        if num_atoms != num_embeds:
            raise Ovis2Error(f"the prompt has {num_atoms} image tokens but its images give {num_embeds}")


def _image_parts(messages) -> list[dict]:
    parts = []
    for message in messages if isinstance(messages, (list, tuple)) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, (list, tuple)):
            parts += [p for p in content if isinstance(p, dict) and p.get("type") == "image"]
    return parts
