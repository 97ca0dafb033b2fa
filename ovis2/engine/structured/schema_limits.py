"""Limits on the two shapes of a JSON schema whose compile time in xgrammar grows with their cube, so that a small
request cannot hold a compile thread (and a core) for minutes. Measured on a 2-core Zen 3 (bench/RESULTS.md):
arrays nested 300 deep compiled in 1.3 s, 600 in 11.5 s, 1200 in 114 s; an object with 1000 optional properties in
0.9 s, 2000 in 10.5 s, 3000 in 29 s. At these limits one compile takes ~0.1 s. Nesting through
`$ref` costs no more than its length, and all-required properties little: neither is limited here."""

from __future__ import annotations

from typing import Any

MAX_SCHEMA_DEPTH = 128  # JSON nesting of the schema's text: an array's items are one level, a property two
Link = tuple | None  # (parent link, key): a place in the schema
MAX_OPTIONAL_PROPERTIES = 512  # in any one object: properties not listed in its 'required'


def schema_shape_problem(schema: Any) -> str | None:
    """What makes this schema too costly to compile, or None. Iterative, so any depth is safe to check; each place
    is a (parent, key) link, spelled out only for the message (a string per place grew with the square of the
    schema's size)."""
    stack: list[tuple[Any, int, Link]] = [(schema, 1, None)]
    while stack:
        value, depth, link = stack.pop()
        if depth > MAX_SCHEMA_DEPTH and isinstance(value, dict | list):
            return (
                f"nests deeper than {MAX_SCHEMA_DEPTH} levels at {_path(link)} (its compile time grows with the "
                "cube of the depth); flatten it, or use '$ref' for recursive shapes"
            )
        if isinstance(value, dict):
            optional = _num_optional_properties(value)
            if optional > MAX_OPTIONAL_PROPERTIES:
                return (
                    f"has {optional} optional properties at {_path(link)}; at most {MAX_OPTIONAL_PROPERTIES} are "
                    "allowed (compile time grows with the cube of their number): list more of them in 'required'"
                )
            stack.extend((child, depth + 1, (link, key)) for key, child in value.items())
        elif isinstance(value, list):
            stack.extend((child, depth + 1, (link, i)) for i, child in enumerate(value))
    return None


def _path(link: Link, max_key_chars: int = 40) -> str:
    """The place as a JSON pointer-like path (each key cut to max_key_chars)."""
    keys = []
    while link is not None:
        link, key = link
        keys.append(str(key)[:max_key_chars])
    return "/".join(["#", *reversed(keys)])


def _num_optional_properties(schema: dict) -> int:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return 0
    required = schema.get("required")
    required = (
        set(required) if isinstance(required, list) and all(isinstance(r, str) for r in required) else set()
    )
    return sum(name not in required for name in properties)
