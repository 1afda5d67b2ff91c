"""Models named on the command line (``train``, ``evaluate``, ``merge``): a local folder, checked before
anything loads, or a Hub id, whose loading failures become one clear line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub.errors import HFValidationError, StrictDataclassError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError

from ..checkpoint import SafetensorsCheckpoint
from ..errors import CheckpointError, InvalidOptionError, SourceNotFoundError


def resolve_model(name: str, flag: str) -> str:
    """The absolute path of the local model folder ``name``, or ``name`` itself when it can only be a Hub id.

    A local folder must hold ``config.json``, and its safetensors shards must all be there and open (their headers
    are checked now, so a corrupt shard fails before any work). ``flag`` names the argument in messages.
    """
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceNotFoundError(f"{flag} {name} is a file; pass a model folder (holding config.json) or a Hub id")
        if not (path / "config.json").is_file():
            raise SourceNotFoundError(f"{flag} {name} has no config.json; pass a model folder or a Hub id")
        SafetensorsCheckpoint(path)  # weights present, never pickled; every shard header valid
        return str(path.resolve())
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise SourceNotFoundError(f"{flag} {name} does not exist; pass a model folder or a Hub id such as 'org/name'") from None
    return name


HUB_FIX = "pass a local model folder, or a Hub id that exists (online, or already in the cache with HF_HUB_OFFLINE=1)"
LOCAL_FIX = "the folder is incomplete, damaged or not a causal LM: copy it again, or re-create it with moe-upcycle"
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, SafetensorError,
               StrictDataclassError)
"""What ``from_pretrained`` raises for a model that is missing, unreachable or damaged: it runs the folder's config
and tokenizer files through their classes, so a wrong value surfaces as any of these."""


@contextmanager
def explained_loading(name: str, what: str = "the model", fix: str | None = None) -> Iterator[None]:
    """Turn a failure of ``from_pretrained`` on ``name`` (a local folder or Hub id) into one line naming it."""
    local = Path(name).is_dir()
    try:
        yield
    except LOAD_ERRORS as err:
        text = " ".join(str(err).split())
        text = text if len(text) <= 400 else text[:400] + "..."
        reason = text.rstrip(".") if isinstance(err, OSError) and text else f"{type(err).__name__}: {text}"
        error = CheckpointError if local else SourceNotFoundError
        raise error(f"cannot load {name!r} ({what}): {reason}; {fix or (LOCAL_FIX if local else HUB_FIX)}") from None


ADAPTER_CONFIG = "adapter_config.json"


def read_adapter_config(folder: Path) -> dict:
    """The JSON object in ``folder/adapter_config.json``; raise one clear error if it is missing or damaged."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise InvalidOptionError(f"{folder} has no {ADAPTER_CONFIG}; pass the output folder of a LoRA run (--use_lora)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the adapter is damaged: copy it again or re-run "
                              "the training") from None
    problem = f"holds a JSON {type(config).__name__}, not an object" if not isinstance(config, dict) else _problem(config)
    if problem:
        raise CheckpointError(f"{path} {problem}; the adapter is damaged: copy it again or re-run the training")
    return config


_ADAPTER_TYPES = {"r": (int,), "lora_alpha": (int, float), "target_modules": (str, list, type(None)),
                  "target_parameters": (list, type(None)), "modules_to_save": (list, type(None))}
"""Fields of a LoRA ``adapter_config.json`` that PEFT uses without checking their JSON types."""


def _problem(config: dict) -> str | None:
    """What is wrong with the fields of an adapter config PEFT would trip over, if anything."""
    from peft.utils import PeftType

    if config.get("peft_type") not in {t.value for t in PeftType}:
        return f"has peft_type {config.get('peft_type')!r}, which is not a PEFT method"
    for key, kinds in _ADAPTER_TYPES.items():
        value = config.get(key)
        if key in config and (isinstance(value, bool) or not isinstance(value, kinds)):
            return f"has {key}={value!r}, expected {' or '.join(k.__name__ for k in kinds)}"
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            return f"has {key}={value!r}, expected a list of names"
    if isinstance(config.get("r"), int) and config["r"] < 1:
        return f"has r={config['r']}, expected an integer >= 1"
    return None


def adapter_base(folder: Path, config: dict) -> str:
    """Where the adapter's base model is: ``base_model_name_or_path`` as recorded (absolute, or relative to the
    current directory), else relative to the adapter folder, else a Hub id."""
    base = config.get("base_model_name_or_path")
    where = f"base_model_name_or_path in {Path(folder) / ADAPTER_CONFIG}"
    if not isinstance(base, str) or not base.strip():
        raise CheckpointError(f"{where} is {base!r}; set it to the base model's folder or Hub id")
    recorded, beside = Path(base).expanduser(), Path(folder) / base
    if not recorded.exists() and beside.exists():
        recorded = beside
    if not recorded.exists():
        try:
            validate_repo_id(base)
        except HFValidationError:
            raise SourceNotFoundError(
                f"the adapter's base model {base} ({where}) does not exist; restore it, or set that field to where "
                "the base model is now"
            ) from None
        return base
    return resolve_model(str(recorded), f"the adapter's base model ({where})")
