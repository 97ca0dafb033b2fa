"""Input processing: the processor and tokenizer, request validation, and a conversation, token ids or
EngineInputs turned into an EngineRequest (its image spans known) for the core."""

from __future__ import annotations

from collections.abc import Sequence

from .. import image_layout
from ..errors import Ovis2Error
from ..inputs import EngineInputs
from ..tokenizer import DEFAULT_EOS_IDS, IMAGE_ATOM_ID
from ..video_sampling import RECIPE_NUM_FRAMES
from .engine_args import EngineArgs
from .request import EngineRequest
from .sampling_params import SamplingParams
from .scalars import is_integer
from .structured.compiler import GrammarCompiler, GrammarStats
from .structured.grammar import Grammar


def load_processor(args: EngineArgs):
    """The checkpoint's processor with the engine's compat, backend and tile cap (its default max_patches)."""
    from ..processing import Ovis2Processor

    tile_cap = {} if args.max_tiles_per_image is None else {"max_patches": args.max_tiles_per_image}
    return Ovis2Processor.from_pretrained(
        args.model, compat=args.compat, use_fast=args.image_processor == "fast", **tile_cap
    )


class InputProcessor:
    def __init__(
        self,
        args: EngineArgs,
        vocab_size: int,
        max_model_len: int,
        tokenizer=None,
        processor=None,
        grammars: GrammarCompiler | None = None,
    ):
        self.args = args
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self._tokenizer = tokenizer
        self._processor = processor
        self._grammars = grammars
        self._owns_grammars = grammars is None  # a compiler handed in (shared by engines) is not closed here

    @property
    def tokenizer(self):
        # the processor's: one tokenizer, with the image tokens (AIDC files lack them)
        if self._tokenizer is None:
            self._tokenizer = self.processor.tokenizer
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
            self._grammars = GrammarCompiler(
                self.tokenizer, self.vocab_size, DEFAULT_EOS_IDS, self.args.grammar_cache_size
            )
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
        """Messages whose image parts carry images and video parts videos; `max_patches` (and a part's own) may
        lower the tile cap, a video part's `num_frames` is 1 to max_video_frames."""
        cap = self.max_tiles_per_image
        asked = [max_patches] + [part.get("max_patches") for part in _parts(messages, "image")]
        for value in asked:
            if value is not None and (type(value) is not int or not 1 <= value <= cap):
                raise Ovis2Error(f"max_patches is {value}; this engine allows 1 to {cap} tiles per image")
        if isinstance(messages, (list, tuple)):
            messages = [self._with_frame_counts(message) for message in messages]
        tiles = max_patches if max_patches is not None else self.args.max_tiles_per_image
        return self.processor.prepare_chat(messages, max_patches=tiles)

    def default_num_frames(self, fps: float | None = None) -> int:
        """Frames a video gives when the request names no count: the recipe's, within max_video_frames; with fps,
        up to max_video_frames."""
        cap = self.args.max_video_frames
        return cap if fps is not None else min(RECIPE_NUM_FRAMES, cap)

    def _with_frame_counts(self, message):
        """The message with each video part's num_frames checked against max_video_frames, or set to the default."""
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, (list, tuple)) or not _parts([message], "video"):
            return message
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "video":
                count = part.get("num_frames")
                valid = (
                    isinstance(count, int)
                    and not isinstance(count, bool)
                    and 1 <= count <= self.args.max_video_frames
                )
                if count is not None and not valid:
                    raise Ovis2Error(
                        f"num_frames is {count!r}; this engine samples 1 to "
                        f"{self.args.max_video_frames} frames per video"
                    )
                part = {**part, "num_frames": count or self.default_num_frames(part.get("fps"))}
            parts.append(part)
        return {**message, "content": parts}

    def prompt_inputs(self, prompt) -> EngineInputs:
        """EngineInputs as they are, a list of token ids, a string (tokenized without a chat template), or vLLM's
        {"prompt": str} / {"prompt_token_ids": [...]} (images go through chat(), or EngineInputs)."""
        if isinstance(prompt, dict):
            prompt = _vllm_prompt(prompt)
        if isinstance(prompt, EngineInputs):
            return prompt
        if isinstance(prompt, str):
            return EngineInputs(self.tokenizer.encode(prompt, add_special_tokens=False))
        if isinstance(prompt, Sequence) and all(is_integer(t) for t in prompt):
            return EngineInputs([int(t) for t in prompt])
        raise Ovis2Error("a prompt must be EngineInputs, a list of token ids (integers) or a string")

    # --- EngineInputs -> EngineRequest
    def make_request(
        self,
        request_id: str,
        inputs: EngineInputs,
        params: SamplingParams,
        arrival_time: float | None = None,
        grammar: Grammar | None = None,
    ) -> EngineRequest:
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
            raise Ovis2Error(
                f"the prompt has {len(ids)} tokens; this model serves at most "
                f"{self.max_model_len - 1} prompt tokens (max_model_len {self.max_model_len})"
            )
        if max(ids) >= self.vocab_size or min(ids) < 0:
            raise Ovis2Error("the prompt holds token ids outside the vocabulary")
        salt = inputs.cache_salt
        if salt is not None and not (isinstance(salt, str) and salt):
            raise Ovis2Error("cache_salt must be a non-empty string")
        self._validate_images(inputs)

    def _validate_images(self, inputs: EngineInputs) -> None:
        num_frames = inputs.num_video_frames
        num_images = len(inputs.images) - num_frames
        if num_images > self.args.max_images_per_request:
            raise Ovis2Error(
                f"{num_images} images in one request; at most {self.args.max_images_per_request} are allowed"
            )
        if num_frames > self.args.max_video_frames_per_request:
            raise Ovis2Error(
                f"{num_frames} video frames in one request; at most "
                f"{self.args.max_video_frames_per_request} are allowed"
            )
        for image in inputs.images:
            if image.num_crops != image_layout.crop_count(image.grid):
                raise Ovis2Error(
                    f"an image with grid {image.grid} needs {image_layout.crop_count(image.grid)} "
                    f"crops, not {image.num_crops}"
                )
        num_atoms = sum(1 for t in inputs.prompt_token_ids if t == IMAGE_ATOM_ID)
        num_embeds = sum(image.num_atoms for image in inputs.images)
        if num_atoms != num_embeds:
            raise Ovis2Error(f"the prompt has {num_atoms} image tokens but its images give {num_embeds}")


def _parts(messages, kind: str) -> list[dict]:
    parts = []
    for message in messages if isinstance(messages, (list, tuple)) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, (list, tuple)):
            parts += [p for p in content if isinstance(p, dict) and p.get("type") == kind]
    return parts


def _vllm_prompt(prompt: dict):
    """vLLM's prompt dicts: the text or the token ids they hold."""
    if "multi_modal_data" in prompt:
        raise Ovis2Error(
            "multi_modal_data is not taken here: send images and videos as parts of chat() messages "
            "({'type': 'image', 'image': <PIL image>}), or as EngineInputs"
        )
    keys = [key for key in ("prompt", "prompt_token_ids") if key in prompt]
    if len(keys) != 1:
        raise Ovis2Error("a prompt dict needs one of 'prompt' (text) or 'prompt_token_ids'")
    return prompt[keys[0]]
