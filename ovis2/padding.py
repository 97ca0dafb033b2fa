"""Padding and truncation of a processor batch, with the meaning transformers' tokenizers give the same arguments
(`padding`, `padding_side`, `truncation`, `max_length`, `pad_to_multiple_of`, `return_attention_mask`; the rules
of `PreTrainedTokenizerBase._get_padding_truncation_strategies`), applied to ids whose image placeholders are
already expanded.

Two differences, both on purpose:
- without `padding`, a batch is padded to its longest prompt on the left (tokenizers default to no padding, which
  cannot make a batch tensor); `max_length` alone still turns truncation on, as it does for a tokenizer;
- a truncation that would cut into or drop an image's placeholder span is an Ovis2Error: the image's pixels
  would no longer match its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import Ovis2Error

PADDING_ARGUMENTS = (
    "padding",
    "padding_side",
    "truncation",
    "max_length",
    "pad_to_multiple_of",
    "return_attention_mask",
)
PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")
TRUNCATION_STRATEGIES = ("longest_first", "only_first", "do_not_truncate")
PADDING_SIDES = ("left", "right")
DEFAULT_PADDING_SIDE = (
    "left"  # what transformers' Ovis2 gets from the -hf tokenizer, and what generation needs
)
LARGE_INTEGER = int(1e20)  # a model_max_length above this is transformers' "no limit" (it stores 1e30)

Span = tuple[int, int]  # [start, end) of one image's placeholder ids


@dataclass(frozen=True)
class BatchLayout:
    """How a batch's sequences are cut and padded: resolved and validated arguments."""

    padding: str = "longest"
    truncate: bool = False
    max_length: int | None = None
    padding_side: str = DEFAULT_PADDING_SIDE
    truncation_side: str = "right"
    pad_to_multiple_of: int | None = None
    return_attention_mask: bool = True

    @classmethod
    def resolve(
        cls,
        tokenizer,
        padding=None,
        truncation=None,
        max_length=None,
        padding_side=None,
        pad_to_multiple_of=None,
        return_attention_mask=None,
    ) -> BatchLayout:
        """The tokenizer's rules for these arguments; `padding=None` (not given) pads to the longest."""
        _check_count("max_length", max_length, minimum=0)
        _check_count("pad_to_multiple_of", pad_to_multiple_of, minimum=1)
        if max_length is not None and padding in (None, False) and truncation is None:
            truncation = "longest_first"  # as the tokenizer: max_length alone truncates
        strategy, truncate = _padding_strategy(padding), _truncates(truncation)
        if max_length is None:
            strategy, truncate, max_length = _model_max_length(tokenizer, strategy, truncate)
        side = padding_side if padding_side is not None else DEFAULT_PADDING_SIDE
        if side not in PADDING_SIDES:
            raise Ovis2Error(f"padding_side must be 'left' or 'right', got {side!r}")
        if truncate and strategy != "do_not_pad" and pad_to_multiple_of and max_length % pad_to_multiple_of:
            raise Ovis2Error(
                f"truncation length {max_length} is not a multiple of pad_to_multiple_of {pad_to_multiple_of}"
            )
        return cls(
            strategy,
            truncate,
            max_length,
            side,
            getattr(tokenizer, "truncation_side", "right"),
            pad_to_multiple_of,
            return_attention_mask is not False,
        )

    def truncated(self, ids: list[int], spans: list[Span], row: int) -> list[int]:
        """`ids` cut to max_length on the truncation side; refused when that would cut into or drop an image."""
        if not self.truncate or len(ids) <= self.max_length:
            return ids
        keep = (
            (0, self.max_length)
            if self.truncation_side == "right"
            else (len(ids) - self.max_length, len(ids))
        )
        for index, (start, end) in enumerate(spans):
            if start < keep[0] or end > keep[1]:
                raise Ovis2Error(
                    f"truncating prompt {row} to max_length={self.max_length} would cut its image {index} "
                    f"(placeholder tokens {start}..{end - 1} of {len(ids)}); raise max_length, use fewer tiles "
                    "(max_patches) or shorten the text"
                )
        return ids[keep[0] : keep[1]]

    def padded(self, sequences: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
        """(input_ids, attention_mask), each sequence padded to the target length on the padding side."""
        width = self._target_length(sequences)
        input_ids, attention_mask = [], []
        for ids in sequences:
            missing = max(0, width - len(ids)) if width is not None else 0
            pads, mask = [pad_id] * missing, [1] * len(ids)
            left = self.padding_side == "left"
            input_ids.append(pads + list(ids) if left else list(ids) + pads)
            attention_mask.append([0] * missing + mask if left else mask + [0] * missing)
        return input_ids, attention_mask

    def _target_length(self, sequences: list[list[int]]) -> int | None:
        if self.padding == "do_not_pad":
            return None
        width = (
            max((len(ids) for ids in sequences), default=0) if self.padding == "longest" else self.max_length
        )
        if self.pad_to_multiple_of and width % self.pad_to_multiple_of:
            width += self.pad_to_multiple_of - width % self.pad_to_multiple_of
        return width


def _model_max_length(tokenizer, strategy: str, truncate: bool) -> tuple[str, bool, int | None]:
    """Without max_length, padding to max_length and truncation use the tokenizer's model_max_length; a tokenizer
    without one (transformers stores 1e30) neither pads nor truncates."""
    limit = getattr(tokenizer, "model_max_length", None) or LARGE_INTEGER + 1
    if limit > LARGE_INTEGER:
        return ("do_not_pad" if strategy == "max_length" else strategy), False, None
    return strategy, truncate, (limit if strategy == "max_length" or truncate else None)


def _padding_strategy(padding) -> str:
    if padding is None or padding is True:
        return "longest"
    if padding is False:
        return "do_not_pad"
    if padding not in PADDING_STRATEGIES:
        raise Ovis2Error(f"padding must be True, False or one of {PADDING_STRATEGIES}, got {padding!r}")
    return padding


def _truncates(truncation) -> bool:
    if truncation is None or truncation is False:
        return False
    if truncation is True:
        return True
    if truncation == "only_second":
        raise Ovis2Error("truncation='only_second' needs text pairs; Ovis2Processor takes single prompts")
    if truncation not in TRUNCATION_STRATEGIES:
        raise Ovis2Error(
            f"truncation must be True, False or one of {TRUNCATION_STRATEGIES}, got {truncation!r}"
        )
    return truncation != "do_not_truncate"


def _check_count(name: str, value, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise Ovis2Error(f"{name} must be an integer >= {minimum}, got {value!r}")
