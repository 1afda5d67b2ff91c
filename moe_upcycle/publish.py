"""``moe-upcycle push``: validate a model folder, then publish it to the Hub in one commit.

Token and endpoint come from the usual places (``HF_TOKEN``, the login cache, ``HF_ENDPOINT``). The
upload is a single commit: large files are uploaded first and become visible only when the commit that
references them succeeds, so a failed push leaves the repository as it was and can simply be re-run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from .card import CARD_FILE, render_card
from .convert.safetensors_io import SafetensorsCheckpoint
from .errors import CheckpointError, UpcycleError

IGNORE = [".*", "*/.*", "__pycache__/*", "*.pyc", "checkpoint-*/*", "runs/*", "training_args.bin"]


class PublishError(UpcycleError):
    """The folder is not publishable, or the Hub refused the upload."""


@dataclass
class PushResult:
    url: str
    files: list[str]
    dry_run: bool


def validate_folder(folder: Path) -> list[str]:
    """Check that ``folder`` is publishable; return the files that would be uploaded.

    The config (or adapter config) must load, every shard named by the index must exist and open, and
    the card must render (it is rendered from the folder when there is none).
    """
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder")
    if (folder / "adapter_config.json").is_file():
        json.loads((folder / "adapter_config.json").read_text())
    else:
        from transformers import AutoConfig

        import moe_upcycle  # noqa: F401  (registers upcycled_moe)

        try:
            AutoConfig.from_pretrained(folder)
        except (OSError, ValueError, KeyError) as err:
            raise PublishError(f"{folder}/config.json does not load: {err}") from None
    try:
        SafetensorsCheckpoint(folder)
    except CheckpointError as err:
        raise PublishError(f"{folder} cannot be published: {err}") from None
    if not (folder / CARD_FILE).is_file():
        render_card(folder)
    else:
        ModelCard.load(folder / CARD_FILE)
    files = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*")
        if p.is_file() and not any(p.relative_to(folder).match(pattern) for pattern in IGNORE)
    )
    return files


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Validate ``folder`` and upload it to ``repo_id`` (created if needed) in one commit."""
    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PublishError(f"repo id {repo_id!r} is not valid ({err}); use 'namespace/name'") from None
    if "/" not in repo_id:
        raise PublishError(f"repo id {repo_id!r} is not valid: use 'namespace/name' (your user or organisation)")
    files = validate_folder(folder)
    card_missing = not (folder / CARD_FILE).is_file()
    if dry_run:
        return PushResult(url=f"(dry run) {repo_id}", files=files + ([CARD_FILE] if card_missing else []), dry_run=True)
    if card_missing:
        render_card(folder, repo_id).save(folder / CARD_FILE)
        files.append(CARD_FILE)
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"Upload {folder.name} with moe-upcycle"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, revision=revision, commit_message=message,
            create_pr=create_pr, ignore_patterns=IGNORE,
        )
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        hint = {401: "log in with `hf auth login` or set HF_TOKEN", 403: "your token cannot write to this repo",
                404: "check the repo id and revision"}.get(status, "try again later")
        raise PublishError(
            f"the Hub refused the upload to {repo_id} (HTTP {status}): {_first_line(err)}; nothing new was "
            f"published: {hint}, then run the same command again"
        ) from None
    url = commit.pr_url if create_pr and commit.pr_url else commit.commit_url
    return PushResult(url=url, files=files, dry_run=False)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
