"""Resolve a source model (local folder or Hub id) to a local folder, downloading only what conversion reads."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .checkpoint import PICKLE_SUFFIXES
from .errors import CheckpointError, InvalidOptionError, SourceNotFoundError

# Config, tokenizer, generation config and safetensors weights; never pickled weights.
DOWNLOAD_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "LICENSE*",
]


def resolve_source(source: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """Return a local folder holding ``source``'s config, tokenizer and safetensors weights.

    A local folder is used as it is; anything else must be a Hub model id, fetched with
    ``huggingface_hub.snapshot_download`` (token, endpoint and offline mode from the usual environment).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if revision is not None:
            raise InvalidOptionError(f"revision={revision!r} applies to Hub ids only, and {source} is a local folder")
        return path
    if path.exists():
        raise SourceNotFoundError(f"{source} is a file; pass the folder holding config.json and the weights")
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise SourceNotFoundError(
            f"{source!r} is neither an existing local folder nor a valid Hub model id (such as 'org/name')"
        ) from None
    try:
        folder = snapshot_download(source, revision=revision, cache_dir=cache_dir, allow_patterns=DOWNLOAD_PATTERNS)
    except RevisionNotFoundError:
        raise SourceNotFoundError(f"revision {revision!r} does not exist in Hub repo {source!r}") from None
    except RepositoryNotFoundError:
        raise SourceNotFoundError(
            f"Hub repo {source!r} was not found (or is private: log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        raise SourceNotFoundError(
            f"{source!r} is not a local folder and could not be downloaded (offline, or the Hub is unreachable); "
            "pass a local folder or connect to the Hub"
        ) from None
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        _refuse_without_safetensors(source, revision)
    return folder


def _refuse_without_safetensors(source: str, revision: str | None) -> None:
    """Say whether the repo has pickled weights only (which are never downloaded) or no weights at all."""
    try:
        files = HfApi().list_repo_files(source, revision=revision)
    except Exception:  # offline or unreachable: the folder check in the reader will speak
        return
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise CheckpointError(
            f"Hub repo {source!r} has only pickled weights ({', '.join(pickled[:3])}); moe-upcycle never unpickles "
            "files. Convert them to safetensors on a machine you trust (load and save_pretrained), or use a "
            "revision that has *.safetensors"
        )
