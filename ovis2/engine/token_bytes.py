"""A token's own bytes, as OpenAI's logprob `bytes` reports them: a token may hold part of a UTF-8 character.

Qwen2's tokenizer is byte-level BPE: each byte of a token is written as one printable character (the GPT-2
byte-to-unicode table), so a token's bytes are that table read backwards. Added (special) tokens are their text.
"""

from __future__ import annotations

import functools


@functools.cache
def byte_decoder() -> dict[str, int]:
    """The byte-level alphabet read backwards: printable Latin-1 bytes stand for themselves, the other 68 bytes
    are written as the characters from U+0100 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


class TokenBytes:
    def __init__(self, backend) -> None:
        self.backend = backend  # a tokenizers.Tokenizer
        self.added_ids = frozenset(backend.get_added_tokens_decoder())

    def __call__(self, token_id: int) -> list[int]:
        token = self.backend.id_to_token(token_id)
        if token is None:
            return []
        decoder = byte_decoder()
        if token_id in self.added_ids or not all(char in decoder for char in token):
            return list(token.encode("utf-8"))
        return [decoder[char] for char in token]
