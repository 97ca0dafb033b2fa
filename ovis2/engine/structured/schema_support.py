"""JSON-schema keywords that xgrammar (0.2.x) compiles without enforcing: a schema using one is refused, since
the output could break it while the server claims to guarantee the shape.

Found by compiling each keyword and feeding the matcher an instance that violates it (tests/engine/
test_structured_schema.py keeps that check). Unknown `format` values stay allowed: JSON Schema makes `format` an
annotation unless a validator knows the format, and Pydantic emits some (`password`, `binary`)."""

from __future__ import annotations

from typing import Any

UNENFORCED = {
    "uniqueItems": "unique array items",
    "contains": "'contains' on arrays",
    "minContains": "'contains' on arrays",
    "maxContains": "'contains' on arrays",
    "dependentRequired": "properties that depend on others",
    "dependentSchemas": "properties that depend on others",
    "dependencies": "properties that depend on others",
    "not": "'not'",
    "if": "if/then/else",
    "then": "if/then/else",
    "else": "if/then/else",
    "$dynamicRef": "dynamic references",
    "$recursiveRef": "recursive references",
}
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
SCHEMA_VALUES = (
    "items",
    "additionalProperties",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
)
SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")


def unenforced_feature(schema: Any, path: str = "#") -> str | None:
    """Where `schema` uses a keyword xgrammar would not enforce, and which: a message, or None."""
    if not isinstance(schema, dict):
        return None
    problem = _own_problem(schema)
    if problem is not None:
        return f"{path}: {problem} cannot be enforced by constrained decoding; remove it from the schema"
    for child, child_path in _subschemas(schema, path):
        found = unenforced_feature(child, child_path)
        if found is not None:
            return found
    return None


def _own_problem(schema: dict) -> str | None:
    for keyword, what in UNENFORCED.items():
        if keyword in schema and not (keyword == "uniqueItems" and schema[keyword] is False):
            return f"{what} ('{keyword}')"
    if "multipleOf" in schema and not (
        schema.get("type") == "integer" and isinstance(schema["multipleOf"], int)
    ):
        return "'multipleOf' other than an integer step on an integer"
    if len(schema.get("allOf") or ()) > 1:
        return "'allOf' with more than one schema"
    ref = schema.get("$ref")
    if isinstance(ref, str) and not (ref == "#" or ref.startswith("#/")):
        return f"a reference outside the schema or to an anchor ('$ref': {ref!r})"
    return None


def _subschemas(schema: dict, path: str):
    for key in SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            yield from ((child, f"{path}/{key}/{name}") for name, child in schema[key].items())
    for key in SCHEMA_VALUES:
        if isinstance(schema.get(key), dict):
            yield schema[key], f"{path}/{key}"
    for key in SCHEMA_LISTS + ("items",):
        if isinstance(schema.get(key), list):
            yield from ((child, f"{path}/{key}/{i}") for i, child in enumerate(schema[key]))
