"""What every wire model shares: strict requests (unknown fields are errors, text is valid Unicode), lenient
responses, ids and timestamps."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


def random_id(prefix: str, separator: str = "-") -> str:
    return f"{prefix}{separator}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        """JSON may carry lone surrogates ("\\ud800"); the tokenizer cannot take them (it raised: a 500)."""
        _check_unicode(value)
        return value


def _check_unicode(value: Any) -> None:
    """Every string in value, through lists and dicts (keys too: metadata and schemas are echoed back)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text must be valid Unicode; it holds a lone surrogate code point") from None
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="allow")
