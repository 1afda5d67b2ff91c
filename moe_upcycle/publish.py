"""``moe-upcycle push``: validate a model folder, then publish it to the Hub in one commit.

Token and endpoint come from the usual places (``HF_TOKEN``, the login cache, ``HF_ENDPOINT``). The
upload is a single commit: large files are uploaded first and become visible only when the commit that
references them succeeds, so a failed push leaves the repository as it was and can simply be re-run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from .card import CARD_FILE, render_card
from .checkpoint import SafetensorsCheckpoint
from .errors import UpcycleError
from .train.sources import adapter_base, explained_loading, read_adapter_config

try:  # the HTTP client of huggingface_hub 2.x, and of 1.x
    from httpx2 import TransportError
except ImportError:  # pragma: no cover
    from httpx import TransportError

NATIVE_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")
"""Config fields of native Transformers MoE classes (Mixtral, Qwen2-MoE, DeepSeek, ...) holding the expert count."""
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

    It must be a folder moe-upcycle wrote (an upcycled or exported MoE model, or a LoRA adapter): the config
    (or adapter config) must load, every shard named by the index must exist and open, and an existing card's
    metadata must parse.
    """
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder")
    checkpoint = SafetensorsCheckpoint(folder)
    if not checkpoint.info:
        raise PublishError(f"{folder} holds no weights (its safetensors files name no tensor)")
    if (folder / "adapter_config.json").is_file():
        adapter_base(folder, read_adapter_config(folder))
    else:
        _check_moe_config(folder, checkpoint)
    if (folder / CARD_FILE).is_file():
        try:
            ModelCard.load(folder / CARD_FILE)
        except (yaml.YAMLError, ValueError) as err:
            reason = " ".join(str(err).split())
            raise PublishError(f"the metadata (YAML front matter) of {folder / CARD_FILE} does not parse ({reason}); "
                               f"fix it, or remove {CARD_FILE} to have the card generated") from None
    files = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*")
        if p.is_file() and not any(p.relative_to(folder).match(pattern) for pattern in IGNORE)
    )
    return files


def _check_moe_config(folder: Path, checkpoint: SafetensorsCheckpoint) -> None:
    """Refuse a config that does not load, a dense model (this command publishes what moe-upcycle wrote), and a
    config that describes other shapes than the weights have (the model, built on the meta device, is compared
    with the safetensors headers tensor by tensor)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from . import modeling  # noqa: F401  (registers upcycled_moe with AutoConfig)

    with explained_loading(str(folder), "its config.json"):
        config = AutoConfig.from_pretrained(folder)
    if config.model_type != "upcycled_moe" and not any(getattr(config, key, 0) for key in NATIVE_EXPERT_COUNTS):
        raise PublishError(
            f"{folder} holds a dense {config.model_type} model, not a MoE model; moe-upcycle push publishes the "
            "folders of convert, train, merge and export: upcycle it first with `moe-upcycle convert`, or upload it "
            "with `hf upload`"
        )
    causal = any(a.endswith("ForCausalLM") for a in [*(config.architectures or []), *(getattr(config, "auto_map", None) or {})])
    with explained_loading(str(folder), "the model its config.json describes"), torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    for name, tensor in model.state_dict().items():
        stored = checkpoint.info.get(name)
        if stored is not None and stored.shape != tuple(tensor.shape):
            raise PublishError(f"{folder}/config.json does not match the weights: {name} is {list(stored.shape)} in "
                               f"{stored.shard} but {list(tensor.shape)} in the model the config describes; the folder "
                               "is damaged: write it again")


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PublishError(f"repo id {repo_id!r} is not valid ({err}); use 'namespace/name'") from None
    if "/" not in repo_id:
        raise PublishError(f"repo id {repo_id!r} is not valid: use 'namespace/name' (your user or organisation)")


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
        _check_repo_id(repo_id)
        files = validate_folder(folder)
        card = None if (folder / CARD_FILE).is_file() else render_card(folder, repo_id)
    except UpcycleError as err:
        raise PublishError(f"nothing was published: {err}") from None
    if card is not None:
        files.append(CARD_FILE)
    if dry_run:
        return PushResult(url=f"(dry run) {repo_id}", files=files, dry_run=True)
    if constants.is_offline_mode():
        raise PublishError("HF_HUB_OFFLINE is set, so the Hub cannot be reached and nothing was published; unset it "
                           "(or check the upload with --dry-run) and run the same command again")
    # The card goes into the commit from memory: the user's folder is never changed.
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(card).encode() if name == CARD_FILE and card
                           else str(folder / name))
        for name in files
    ]
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"Upload {folder.name} with moe-upcycle"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(repo_id, operations=operations, revision=revision, commit_message=message,
                                   create_pr=create_pr)
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        hint = {401: "log in with `hf auth login` or set HF_TOKEN", 403: "your token cannot write to this repo",
                404: "check the repo id and revision"}.get(status, "try again later")
        raise PublishError(
            f"the Hub refused the upload to {repo_id} (HTTP {status}): {_first_line(err)}; nothing new was "
            f"published: {hint}, then run the same command again"
        ) from None
    except (TransportError, ConnectionError) as err:  # unreachable endpoint, proxy, DNS; HF_HUB_OFFLINE set meanwhile
        raise PublishError(
            f"could not reach the Hub at {endpoint or constants.ENDPOINT} ({type(err).__name__}: {_first_line(err)}); "
            "nothing new was published: check the network, HF_ENDPOINT and any proxy, then run the same command again"
        ) from None
    url = commit.pr_url if create_pr and commit.pr_url else commit.commit_url
    return PushResult(url=url, files=files, dry_run=False)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
