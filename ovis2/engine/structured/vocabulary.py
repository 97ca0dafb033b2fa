"""The token table xgrammar matches against, built from the tokenizer on input processing's side.

It spans the model's vocabulary (151936 for Ovis2), which is larger than the tokenizer's: the ids past the
tokenizer are padding, empty in the table, so no grammar ever allows them. The tokenizer's special tokens
(`<|im_start|>`, the image tokens, ...) are left empty too: xgrammar would otherwise read `<|im_start|>` as
twelve characters of text that a JSON string may hold. A grammar's stop tokens are set per matcher.

JSON grammars get a second table without the tokens that hold a raw control character (tab, newline, ...):
xgrammar 0.2.9 lets length-bounded JSON strings (`maxLength`) take them, which is not JSON, and compact JSON
never needs one (whitespace between values is off; inside strings they must be escaped)."""

from __future__ import annotations

from collections.abc import Sequence


def grammar_vocabulary(tokenizer, vocab_size: int, stop_token_ids: Sequence[int]):
    """-> xgrammar.TokenizerInfo over `vocab_size` ids; `stop_token_ids` are its default stop tokens."""
    import xgrammar as xgr

    detected = xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
    )
    special = {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    encoded = [""] * vocab_size
    for token, token_id in tokenizer.get_vocab().items():
        if token_id < vocab_size and token_id not in special:
            encoded[token_id] = token
    return xgr.TokenizerInfo(
        encoded,
        detected.vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=list(stop_token_ids),
        add_prefix_space=detected.add_prefix_space,
    )


def json_vocabulary(vocabulary):
    """The same table less every token holding a byte below 0x20 (for JSON grammars)."""
    import xgrammar as xgr

    decoded = [b"" if any(byte < 0x20 for byte in token) else token for token in vocabulary.decoded_vocab]
    return xgr.TokenizerInfo(
        decoded,
        xgr.VocabType.RAW,
        vocab_size=vocabulary.vocab_size,
        stop_token_ids=vocabulary.stop_token_ids,
        add_prefix_space=False,
    )
