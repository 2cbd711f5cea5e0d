"""Where `--model` points: a checkpoint directory, or a Hugging Face id (`Wan-AI/Wan2.2-T2V-A14B-Diffusers`)
found in the local Hugging Face cache. Nothing is downloaded: a server must not fetch tens of
gigabytes at startup, and it may have no network; a missing id is an error naming the command
that downloads it.

The name a model is served under by default is derived from the directory: the Hugging Face id
for a snapshot in the cache (however it was named on the command line), else the folder's name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# `org/name` as the Hub spells repo ids (letters, digits, `-`, `_`, `.`; no `--` or `..`).
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# The cache keeps a repo in `models--{org}--{name}/snapshots/{revision}/`.
_CACHE_REPO = re.compile(r"models--(.+?)--(.+)")


class ModelNotFound(ValueError):
    """`--model` is neither a directory nor a model in the local Hugging Face cache."""


def looks_like_hf_id(text: str) -> bool:
    return _HF_ID.fullmatch(text) is not None and "--" not in text and ".." not in text


def model_directory(model: str | Path) -> Path:
    """The checkpoint directory `model` names: `model` itself when it is a directory, else the
    snapshot of the Hugging Face id `model` in the local cache. ModelNotFound names the fix."""
    path = Path(model)
    if path.is_dir():
        return path
    text = str(model)
    if not looks_like_hf_id(text):
        raise ModelNotFound(f"model directory {text} does not exist; pass --model DIR of a Wan checkpoint")
    snapshot = cached_snapshot(text)
    if snapshot is None:
        raise ModelNotFound(
            f"{text} is neither a directory nor a model in the local Hugging Face cache ({cache_dir_label()}); "
            f"download it first with `hf download {text}` (`huggingface-cli download {text}` with "
            "huggingface_hub before 1.0), or pass --model DIR of a Wan checkpoint"
        )
    return snapshot


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of `repo_id` (its `main` revision), or None when it is not cached. Offline:
    `local_files_only` makes huggingface_hub read the cache and never the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=_cache_dir()))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None


def served_name(model_dir: Path) -> str:
    """The default name a model is served under: the Hugging Face id of a cached snapshot, else the
    directory's name."""
    snapshots = model_dir.parent
    if snapshots.name == "snapshots" and (match := _CACHE_REPO.fullmatch(snapshots.parent.name)):
        return f"{match[1]}/{match[2]}"
    return model_dir.name


def _cache_dir() -> str | None:
    """HF_HUB_CACHE as set now (huggingface_hub reads it once, at import); None: the library's default."""
    return os.environ.get("HF_HUB_CACHE") or None


def cache_dir_label() -> str:
    if cache := _cache_dir():
        return cache
    from huggingface_hub.constants import HF_HUB_CACHE

    return HF_HUB_CACHE
