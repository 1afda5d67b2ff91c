"""Arguments of the training recipe, parsed with ``transformers.HfArgumentParser`` like the Transformers examples.

Every ``TrainingArguments`` field is a flag and a YAML key; ``--config FILE.yaml`` supplies defaults that
flags on the command line override.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import strtobool

from ..errors import InvalidOptionError, OutputExistsError
from ..yaml_config import apply_yaml_defaults, config_path
from .lora_targets import LORA_TARGET_GROUPS, groups_help
from .outputs import write_error


def check_strings(args) -> None:
    """Refuse a non-string in a string field (or list of strings): a YAML recipe can put any value there, the command
    line cannot."""
    for item in fields(args):
        value, kind = getattr(args, item.name), str(item.type)
        if "str" not in kind or value is None:
            continue
        if kind.startswith("list"):
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise InvalidOptionError(f"{item.name}={value!r} is invalid: expected a string or a list of strings")
        elif not isinstance(value, str):
            raise InvalidOptionError(f"{item.name}={value!r} is invalid: expected a string")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "upcycled (or dense) model: local folder or Hub id"})
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the model"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the checkpoint's own modeling code"})

    def __post_init__(self):
        check_strings(self)


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "local .txt, .json/.jsonl or .parquet file"})
    validation_file: str | None = field(default=None, metadata={"help": "local validation file (same formats)"})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (instead of --train_file)"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "configuration of the Hub dataset"})
    streaming: bool = field(default=False, metadata={"help": "stream the Hub dataset instead of downloading it"})
    text_column: str = field(default="text", metadata={"help": "column holding the text"})
    block_size: int = field(default=256, metadata={"help": "tokens per packed training block"})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "percent of the training data held out when no validation set is given"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "keep at most this many training blocks"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "keep at most this many validation blocks"})

    def __post_init__(self):
        check_strings(self)
        if self.block_size < 2:
            raise InvalidOptionError(f"block_size={self.block_size} is invalid: expected an integer >= 2")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidOptionError(f"{name}={value} is invalid: expected an integer >= 1 (or leave it unset for all)")

    @property
    def paragraphs(self) -> bool:
        """Local plain-text data is read paragraph by paragraph."""
        path = self.train_file or self.validation_file
        return self.dataset_name is None and path is not None and Path(path).suffix.lower() in (".txt", ".text")


@dataclass
class MoeArguments:
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters (PEFT) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout of module targets (experts need 0)"})
    lora_target: list[str] = field(
        default_factory=lambda: ["attention", "experts", "router"],
        metadata={"help": f"what to adapt, space- or comma-separated: groups {groups_help()}, and/or linear module "
                          "names (q_proj, self_attn.o_proj, ...)"},
    )
    train_router: bool = field(default=True, metadata={"help": "train the routers fully (with --use_lora)"})
    router_only: bool = field(default=False, metadata={"help": "train only the routers"})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "override the config's aux coef"})
    router_z_loss_coef: float | None = field(default=None, metadata={"help": "override the config's z-loss coef"})
    freeze_vision: bool = field(default=True, metadata={
        "help": "vision-language models: keep the vision tower frozen (the projector trains in full fine-tuning; "
                "with --use_lora only the LoRA targets and routers train, never the vision tower or projector)"})
    routing_heatmap: bool = field(default=True, metadata={"help": "save expert_load.png at the end of training"})

    def __post_init__(self):
        if isinstance(self.lora_target, str):  # MoeArguments(lora_target="attention,experts") from Python
            self.lora_target = [self.lora_target]
        check_strings(self)
        given = self.lora_target
        self.lora_target = [name for item in given for name in re.split(r"[,\s]+", item) if name]
        if self.use_lora and self.router_only:
            raise InvalidOptionError("use_lora and router_only exclude each other: choose one way to train")
        if self.lora_r < 1:
            raise InvalidOptionError(f"lora_r={self.lora_r} is invalid: expected an integer >= 1")
        if self.use_lora and not self.lora_target:
            raise InvalidOptionError(
                f"lora_target={' '.join(given)!r} names nothing to adapt: give groups ({', '.join(LORA_TARGET_GROUPS)}) "
                "and/or linear module names"
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise InvalidOptionError(
                    f"{name}={value} is invalid: expected a finite number >= 0 (leave it unset to keep the model's own)"
                )


ALL_ARGUMENTS = (ModelArguments, DataArguments, MoeArguments, TrainingArguments)


def _no_accelerator() -> bool:
    import torch

    return not torch.accelerator.is_available()


def parse_train_args(argv: Sequence[str] | None = None):
    """Parse ``argv`` (with an optional ``--config FILE.yaml``) into the four argument dataclasses.

    On a machine with no accelerator ``use_cpu`` defaults to true: ``--bf16`` then means CPU autocast, and
    the processes of ``accelerate launch --multi_gpu --num_processes N`` form one gloo DDP group instead of
    training N independent copies.
    """
    config, rest = config_path(list(argv) if argv is not None else sys.argv[1:])
    if _no_accelerator() and "--use_cpu" not in rest:
        rest = [*rest, "--use_cpu", "true"]
    parser = HfArgumentParser(ALL_ARGUMENTS)
    parser.add_argument("--config", type=Path, help="YAML file of defaults; command-line flags override it")
    apply_yaml_defaults(parser, config)
    try:
        *dataclasses, _config = parser.parse_args_into_dataclasses(args=list(rest))
    except ValueError as err:  # unknown flags, or TrainingArguments' own validation
        raise InvalidOptionError(str(err)) from None
    training_args = dataclasses[-1]
    check_steps(training_args)
    check_output_dir(training_args.output_dir)
    training_args.resume_from_checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    return tuple(dataclasses)


def check_steps(args: TrainingArguments) -> None:
    """Refuse a run that would take no optimizer step (its output would be the model it started from), or that
    has no batch to take one with."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise InvalidOptionError(f"{name}={getattr(args, name)} is invalid: expected an integer >= 1")
    if args.max_steps == 0 or (args.max_steps < 0 and not args.num_train_epochs > 0):
        raise InvalidOptionError(
            f"max_steps={args.max_steps} with num_train_epochs={args.num_train_epochs} trains 0 steps, and the output "
            "would be the unchanged model: pass --max_steps N (N >= 1) or --num_train_epochs > 0"
        )


def check_output_dir(output_dir: str) -> None:
    """Refuse an ``--output_dir`` that cannot become a folder, before anything is loaded."""
    path = Path(output_dir).expanduser()
    try:
        existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    except OSError as err:  # e.g. a name too long for the file system
        raise write_error(path, err, "--output_dir") from None
    if existing == path and not path.is_dir():
        raise OutputExistsError(f"--output_dir {output_dir} is a file; choose a folder")
    if not existing.is_dir():
        raise OutputExistsError(f"--output_dir {output_dir} cannot be created: {existing} is a file; choose another folder")


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or ``true`` for the last ``checkpoint-N`` in ``output_dir``."""
    if value is None:
        return None
    try:
        wanted = bool(strtobool(value))
    except ValueError:  # a path
        if not (Path(value) / "trainer_state.json").is_file():
            found = "does not exist" if not Path(value).exists() else "is not a checkpoint (no trainer_state.json)"
            raise InvalidOptionError(
                f"--resume_from_checkpoint {value} {found}; pass a checkpoint-N folder of an earlier run, or `true` "
                "for the last one in --output_dir"
            ) from None
        return value
    if not wanted:
        return None
    last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if last is None:
        raise InvalidOptionError(
            f"--resume_from_checkpoint true found no checkpoint-N folder in --output_dir {output_dir}; point "
            "--output_dir at the interrupted run (checkpoints are saved with --save_strategy steps) or start afresh"
        )
    return last
