"""The one resolver of a model name to its files: a local directory, "demo", or a hub id (downloaded once)."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from .errors import Ovis2Error

DEMO = "demo"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
WEIGHT_PATTERNS = ("*.safetensors",)


def resolve_checkpoint(path_or_id: str | os.PathLike, model_class: type | None = None) -> Path:
    """The directory holding the checkpoint's files.

    model_class: the model whose weights are wanted (the demo writes its random weights with it, a hub download
    includes the weights); None fetches the config, tokenizer and processor files only."""
    text = str(path_or_id)
    if text == DEMO:
        from .demo import demo_files

        return demo_files(model_class)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if local.exists() or not HUB_ID.match(text):
        raise Ovis2Error(
            f"model {text!r} is neither a checkpoint directory, 'demo', nor a hub id like 'org/name'"
        )
    return _download(text, with_weights=model_class is not None)


REASON_CHARS = 500  # of the hub's first error line: the whole of it, short of a page


@functools.cache  # the model, tokenizer and processor all resolve the same id: ask the hub once per process
def _download(repo_id: str, with_weights: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [*CONFIG_PATTERNS, *(WEIGHT_PATTERNS if with_weights else ())]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 3] + "..."
        raise Ovis2Error(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({reason}); check the id and the network "
            "(HF_HUB_OFFLINE unset, HF_TOKEN for gated repos), or pass a local checkpoint directory"
        ) from None
