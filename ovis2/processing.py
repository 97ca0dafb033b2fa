"""Ovis2Processor: chat messages and images -> the token ids and pixels Ovis2 expects.

Two paths build token ids:

- `__call__(images=..., text=...)` follows transformers: the prompt text is trusted (special tokens in it
  are control tokens) and each `<image>` in it becomes the image's placeholder ids.
- the message path (`apply_chat_template(tokenize=True)`, `prepare_chat`) never parses user text for
  control tokens: the template is rendered with markers in place of user text, the control tokens the
  template writes become ids, user text is tokenized as plain text, and image parts get placeholder ids
  directly. For ordinary text both paths give the same ids.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from . import image_layout
from .checkpoint import resolve_checkpoint
from .errors import Ovis2Error
from .image_layout import TOKENS_PER_CROP
from .image_processing import (
    Ovis2ImageProcessor,
    flatten_images,
    is_original_checkpoint,
    read_json,
    to_pil_image,
)
from .image_processing_fast import Ovis2ImageProcessorFast
from .inputs import EngineInputs, ImageInput
from .padding import PADDING_ARGUMENTS, BatchLayout
from .tokenizer import (
    CHAT_TEMPLATE,
    FIRST_ADDED_TOKEN_ID,
    IMAGE_ATOM_ID,
    IMAGE_TOKENS,
    VISUAL_INDICATOR_IDS,
)
from .video_parts import expand_video_parts

IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PROCESSOR_CONFIG = "processor_config.json"
MULTI_IMAGE_MAX_PATCHES = 4  # the model cards' max_partition for each image when a request has several
# The original AIDC formatter adds the default system turn only when the conversation has none.
ORIGINAL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}" + CHAT_TEMPLATE.split("<|im_end|>\n", 1)[1]
)
_MARKER_CHARS = [chr(code) for code in range(0xE000, 0xE040)]  # private-use characters


class Ovis2Processor:
    """Wraps an Ovis2 image processor, a tokenizer and a chat template."""

    def __init__(
        self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length=TOKENS_PER_CROP
    ):
        if tokenizer is None:
            from .tokenizer import build_tokenizer

            tokenizer = build_tokenizer()
        if image_seq_length != TOKENS_PER_CROP:
            raise Ovis2Error(
                f"Ovis2 uses {TOKENS_PER_CROP} tokens per crop, got image_seq_length={image_seq_length}"
            )
        self.image_processor = image_processor if image_processor is not None else Ovis2ImageProcessor()
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
        self.image_token = IMAGE_TOKEN
        self.image_seq_length = image_seq_length
        self.video_limits = None  # ovis2.video.VideoLimits for video parts (None: its defaults)
        ensure_image_tokens(tokenizer)
        self._plain_encoder = _plain_text_encoder(tokenizer)
        self._control_pattern = _control_token_pattern(tokenizer)
        self._render([{"role": "user", "content": "hi"}], True)  # a template that cannot render fails here

    @property
    def compat(self) -> str:
        return self.image_processor.compat

    # ------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, path_or_hub_id, compat: str = "ovis", use_fast: bool = False, **image_kwargs):
        """A -hf checkpoint (tokenizer, preprocessor/processor configs, chat template) or an original one."""
        folder = resolve_checkpoint(path_or_hub_id)
        image_class = Ovis2ImageProcessorFast if use_fast else Ovis2ImageProcessor
        image_processor = image_class.from_pretrained(folder, compat=compat, **image_kwargs)
        tokenizer = load_tokenizer(folder)
        config = read_json(folder / PROCESSOR_CONFIG)
        template = (
            ORIGINAL_CHAT_TEMPLATE
            if is_original_checkpoint(folder)
            else read_chat_template(folder, tokenizer)
        )
        return cls(image_processor, tokenizer, template, config.get("image_seq_length", TOKENS_PER_CROP))

    def save_pretrained(self, folder) -> Path:
        """Writes the -hf files: tokenizer, preprocessor_config.json, processor_config.json, chat_template.jinja."""
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        config = {"image_seq_length": self.image_seq_length, "processor_class": "Ovis2Processor"}
        (path / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (path / CHAT_TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")
        return path

    # ------------------------------------------------------------ placeholders

    def image_placeholder_ids(self, grid) -> list[int]:
        """START, the thumbnail's atoms, GRID, [tiles row by row with COL/ROW between], END."""
        return image_layout.placeholder_ids(grid)

    def image_token_count(self, width: int, height: int, max_patches: int | None = None) -> int:
        """Prompt tokens an image of this size costs, from its size alone (no decoding)."""
        return image_layout.token_count(self.image_processor.grid_for_size(width, height, max_patches))

    # ------------------------------------------------------------ the text path (as transformers)

    def __call__(
        self,
        images=None,
        text=None,
        return_tensors: str | None = "pt",
        max_patches=None,
        min_patches=None,
        **kwargs,
    ):
        """Expands each `<image>` of `text` into its placeholder ids. The tokenizer's padding and truncation
        arguments (`PADDING_ARGUMENTS`) keep their meaning (ovis2/padding.py); without `padding`, batches are
        padded to their longest prompt on the left."""
        layout = self._batch_layout(kwargs)
        if text is None:
            return self.image_processor(images, return_tensors=return_tensors, max_patches=max_patches)
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(item, str) for item in texts):
            raise Ovis2Error("text must be a string or a list of strings")
        images = flatten_images(images)
        _check_image_count(sum(item.count(IMAGE_TOKEN) for item in texts), len(images))
        pixels = (
            self.image_processor(
                images, return_tensors=return_tensors, max_patches=max_patches, min_patches=min_patches
            )
            if images
            else None
        )
        grids = iter([list(map(int, grid)) for grid in pixels["grids"]] if pixels else [])
        encoded = [self._encode_prompt(item, grids) for item in texts]
        sequences = [layout.truncated(ids, spans, row) for row, (ids, spans) in enumerate(encoded)]
        return self._batch(sequences, pixels, return_tensors, layout)

    def _batch_layout(self, kwargs: dict) -> BatchLayout:
        unknown = sorted(set(kwargs) - set(PADDING_ARGUMENTS))
        if unknown:
            raise Ovis2Error(
                f"Ovis2Processor got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; it takes "
                f"images, text, return_tensors, max_patches, min_patches and {', '.join(PADDING_ARGUMENTS)}"
            )
        return BatchLayout.resolve(self.tokenizer, **kwargs)

    def _encode_prompt(self, text: str, grids) -> tuple[list[int], list[tuple[int, int]]]:
        """The prompt's ids and each image's placeholder span [start, end) in them."""
        pieces = text.split(IMAGE_TOKEN)
        ids, spans = self._encode(pieces[0]), []
        for piece in pieces[1:]:
            placeholder = self.image_placeholder_ids(next(grids))
            spans.append((len(ids), len(ids) + len(placeholder)))
            ids += placeholder + self._encode(piece)
        return ids, spans

    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=False)["input_ids"]

    def _encode_plain(self, text: str) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode does not: a 9 MB text held the server's event
        # loop and engine for seconds)
        return self._plain_encoder.encode_batch([text], add_special_tokens=False)[0].ids if text else []

    def _batch(self, sequences: list[list[int]], pixels, return_tensors, layout: BatchLayout | None = None):
        from transformers import BatchFeature

        layout = layout or BatchLayout()
        input_ids, attention_mask = layout.padded(sequences, self.pad_token_id)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixels is not None:
            data.update(pixel_values=pixels["pixel_values"], grids=pixels["grids"])
        if return_tensors == "pt":
            data["input_ids"], data["attention_mask"] = _long_tensor(input_ids), _long_tensor(attention_mask)
        if not layout.return_attention_mask:
            del data["attention_mask"]
        return BatchFeature(data)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.convert_tokens_to_ids("<|endoftext|>")

    # ------------------------------------------------------------ the message path

    def apply_chat_template(
        self,
        conversation,
        tokenize: bool = False,
        add_generation_prompt: bool = True,
        return_dict: bool = False,
        return_tensors: str | None = "pt",
        max_patches: int | None = None,
        **template_kwargs,
    ):
        """Renders OpenAI-style messages (or a batch of conversations); with `tokenize`, token ids."""
        is_batch = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = [
            expand_video_parts(c, self.video_limits) for c in (conversation if is_batch else [conversation])
        ]
        if not tokenize:
            texts = [self._render(c, add_generation_prompt, **template_kwargs) for c in conversations]
            return texts if is_batch else texts[0]
        encoded = [
            self._encode_conversation(c, add_generation_prompt, self.default_patches(c, max_patches))
            for c in conversations
        ]
        sequences = [ids for ids, _ in encoded]
        if not return_dict:
            return sequences if is_batch else sequences[0]
        results = [result for _, image_results in encoded for result in image_results]
        pixels = None
        if results:
            from .image_processing import make_batch_feature

            pixels = make_batch_feature(results, return_tensors)
        return self._batch(sequences, pixels, return_tensors)

    def prepare_chat(self, messages, max_patches: int | None = None) -> EngineInputs:
        """Messages whose image parts carry images -> prompt ids (generation prompt added) and images.

        An image part may carry its own `"max_patches"`, which wins over the call's for that image. A video part
        (ovis2/video_parts.py) becomes its sampled frames, one crop each."""
        import torch

        messages = expand_video_parts(messages, self.video_limits)
        max_patches = self.default_patches(messages, max_patches)
        ids, results = self._encode_conversation(messages, True, max_patches, require_images=True)
        images = []
        for part, (pixels, grid) in zip(_message_image_parts(messages), results, strict=True):
            max_used, min_used = self.image_processor.resolve_patches(_part_patches(part, max_patches))
            images.append(
                ImageInput(
                    pixel_values=torch.as_tensor(pixels, dtype=torch.float32),
                    grid=tuple(int(n) for n in grid),
                    content_hash=self.content_hash(part["image"], max_used, min_used),
                    is_video_frame=bool(part.get("video_frame")),
                )
            )
        return EngineInputs(prompt_token_ids=ids, images=images)

    def chat_token_ids(self, messages, max_patches: int | None = None) -> tuple[list[int], int]:
        """(prompt ids, image tokens) of messages whose image parts carry an image or an `"image_size"`:
        (width, height); only sizes are read, no pixels are cropped, normalised or hashed. A video part carries
        its video (decoded to count its frames) or `"num_frames"`, the frames it gives."""
        messages = expand_video_parts(messages, self.video_limits, counting=True)
        max_patches = self.default_patches(messages, max_patches)
        texts = _message_texts(messages)
        parts = _message_image_parts(messages)
        grids = [
            self.image_processor.grid_for_size(*_part_size(part), _part_patches(part, max_patches))
            for part in parts
        ]
        marker = _pick_marker(texts)
        rendered = self._render(_with_markers(messages, marker), True)
        ids = self._encode_rendered(rendered, marker, texts, [(None, grid) for grid in grids], len(parts))
        return ids, sum(image_layout.token_count(grid) for grid in grids)

    def default_patches(self, messages, max_patches: int | None) -> int | None:
        """The call's tile cap; when neither the call nor the image processor sets one, compat ovis follows the
        model cards: max_partition 4 for each image of a request with several (video frames not counted)."""
        if max_patches is not None or self.image_processor.max_patches is not None or self.compat != "ovis":
            return max_patches
        images = [part for part in _message_image_parts(messages) if not part.get("video_frame")]
        return MULTI_IMAGE_MAX_PATCHES if len(images) > 1 else None

    def content_hash(self, image, max_patches: int, min_patches: int) -> str:
        """sha256 over the pixels, mode, size and palette, plus everything that shapes the crops."""
        pil = to_pil_image(image)
        digest = hashlib.sha256()
        setting = (pil.mode, pil.size, self.compat, self.image_processor.backend, max_patches, min_patches)
        digest.update(repr(setting).encode())
        digest.update(repr(pil.info.get("transparency")).encode())
        if pil.palette is not None:
            digest.update(bytes(pil.getpalette() or []))
        digest.update(pil.tobytes())
        return digest.hexdigest()

    def _render(self, messages, add_generation_prompt: bool, **template_kwargs) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                list(messages),
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **template_kwargs,
            )
        except TemplateError as error:  # a syntax error, or the template's own raise_exception()
            raise Ovis2Error(f"the chat template failed: {error}") from error

    def _encode_conversation(self, messages, add_generation_prompt, max_patches, require_images=False):
        """-> (prompt ids, [(pixel_values, grid)] per image part)."""
        texts = _message_texts(messages)
        images = _message_images(messages)
        has_pixels = [image is not None for image in images]
        if any(has_pixels) and not all(has_pixels) or (require_images and not all(has_pixels)):
            raise Ovis2Error('every image part needs its image: {"type": "image", "image": <PIL image>}')
        marker = _pick_marker(texts)
        rendered = self._render(_with_markers(messages, marker), add_generation_prompt)
        results = [
            self.image_processor.preprocess_image(part["image"], _part_patches(part, max_patches))
            for part in _message_image_parts(messages)
            if part.get("image") is not None
        ]
        return self._encode_rendered(rendered, marker, texts, results, len(images)), results

    def _encode_rendered(self, rendered: str, marker: str, texts, results, num_images: int) -> list[int]:
        split = re.split(f"({re.escape(marker)}\\d+{re.escape(marker)}|{re.escape(IMAGE_TOKEN)})", rendered)
        _check_image_count(split[1::2].count(IMAGE_TOKEN), num_images)
        ids, pending, image_index = [], [], 0
        for index, piece in enumerate(split):
            if index % 2 == 1 and piece == IMAGE_TOKEN and results:
                ids += self._encode_plain("".join(pending)) + self.image_placeholder_ids(
                    results[image_index][1]
                )
                pending, image_index = [], image_index + 1
            elif index % 2 == 1 and piece != IMAGE_TOKEN:
                pending.append(texts[int(piece.strip(marker))])
            else:
                ids, pending = self._add_template_text(piece, ids, pending)
        return ids + self._encode_plain("".join(pending))

    def _add_template_text(self, text: str, ids: list[int], pending: list[str]):
        """Template text: its control tokens become ids, the rest joins the pending plain text."""
        for index, piece in enumerate(self._control_pattern.split(text)):
            if index % 2 == 0:
                pending.append(piece)
            else:
                ids = (
                    ids + self._encode_plain("".join(pending)) + [self.tokenizer.convert_tokens_to_ids(piece)]
                )
                pending = []
        return ids, pending

    # ------------------------------------------------------------ decoding

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)


# ---------------------------------------------------------------- messages


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise Ovis2Error("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise Ovis2Error(f"each message needs a role among {ROLES}, got {message!r:.80}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list, tuple)):
            raise Ovis2Error("message content must be a string or a list of parts")
        for part in content if isinstance(content, (list, tuple)) else []:
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                raise Ovis2Error(
                    f"content parts must be of type 'text', 'image' or 'video', got {part!r:.80}"
                )
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise Ovis2Error("a text part needs a string 'text'")


def _parts(message) -> list[dict]:
    content = message.get("content")
    if content is None:
        return []
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _message_texts(messages) -> list[str]:
    _check_messages(messages)
    return [part["text"] for message in messages for part in _parts(message) if part["type"] == "text"]


def _message_image_parts(messages) -> list[dict]:
    return [part for message in messages for part in _parts(message) if part["type"] == "image"]


def _message_images(messages) -> list:
    return [part.get("image") for part in _message_image_parts(messages)]


def _part_patches(part: dict, default: int | None) -> int | None:
    """An image part's own tile cap, else the call's."""
    return part.get("max_patches", default)


def _part_size(part: dict) -> tuple[int, int]:
    size = part.get("image_size")
    if size is None:
        if part.get("image") is None:
            raise Ovis2Error('an image part needs its image or its "image_size": (width, height)')
        size = to_pil_image(part["image"]).size
    return int(size[0]), int(size[1])


def _pick_marker(texts: list[str]) -> str:
    for char in _MARKER_CHARS:
        if not any(char in text for text in texts):
            return char
    raise Ovis2Error("message text uses every private-use marker character U+E000..U+E03F")


def _with_markers(messages, marker: str) -> list[dict]:
    """The messages with each text replaced by `marker<n>marker` and images reduced to `{"type": "image"}`."""
    counter = iter(range(1 << 30))
    converted = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            content = f"{marker}{next(counter)}{marker}"
        elif content is not None:
            content = [
                {"type": "text", "text": f"{marker}{next(counter)}{marker}"}
                if part["type"] == "text"
                else {"type": "image"}
                for part in content
            ]
        converted.append({"role": message["role"], "content": content if content is not None else ""})
    return converted


def _check_image_count(num_markers: int, num_images: int) -> None:
    if num_markers != num_images:
        raise Ovis2Error(
            f"the prompt has {num_markers} {IMAGE_TOKEN} marker(s) but {num_images} image(s) were given; "
            "pass exactly one image per marker"
        )


def _long_tensor(rows: list[list[int]]):
    import torch

    if len({len(row) for row in rows}) > 1:
        raise Ovis2Error(
            "the prompts have different lengths, so they cannot make one tensor; pass padding=True (or "
            "'longest' / 'max_length'), or return_tensors=None"
        )
    return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------- tokenizer helpers


def ensure_image_tokens(tokenizer) -> tuple[int, tuple[int, ...]]:
    """The -hf image token ids; added (as 151665..151670) to a tokenizer that lacks them, as the original does."""
    ids = [tokenizer.convert_tokens_to_ids(token) for token in IMAGE_TOKENS]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        from tokenizers import AddedToken

        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS], special_tokens=True
        )
        ids = [tokenizer.convert_tokens_to_ids(token) for token in IMAGE_TOKENS]
    if ids != [IMAGE_ATOM_ID, *VISUAL_INDICATOR_IDS]:
        raise Ovis2Error(f"the tokenizer maps the image tokens to {ids}, expected 151665..151670")
    return ids[0], tuple(ids[1:])


def _plain_text_encoder(tokenizer):
    """A private copy of the Rust tokenizer that never matches special tokens (transformers would toggle
    `encode_special_tokens` on the shared one for each call, which is not safe across threads)."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise Ovis2Error("Ovis2Processor needs a fast (tokenizers-backed) tokenizer")
    copy = Tokenizer.from_str(backend.to_str())
    copy.encode_special_tokens = True
    return copy


def _control_token_pattern(tokenizer) -> re.Pattern:
    tokens = sorted(
        {token.content for token in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True
    )
    return re.compile("(" + "|".join(re.escape(token) for token in tokens) + ")")


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise Ovis2Error(f"no usable tokenizer files in {folder}: {error}") from error
    # transformers builds a near-empty tokenizer when the files are missing
    if len(tokenizer) < FIRST_ADDED_TOKEN_ID:
        raise Ovis2Error(
            f"no usable tokenizer files in {folder}: the tokenizer read has {len(tokenizer)} tokens, "
            f"Ovis2's (Qwen2's) has {FIRST_ADDED_TOKEN_ID} and more"
        )
    return tokenizer


def read_chat_template(folder: Path, tokenizer) -> str:
    """chat_template.jinja, else chat_template.json, else the tokenizer's, else the -hf default."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    from_json = read_json(folder / "chat_template.json").get("chat_template")
    return from_json or getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
