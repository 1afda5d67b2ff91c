"""Arguments of the training recipe, parsed with ``transformers.HfArgumentParser`` like the Transformers examples.

Every ``TrainingArguments`` field is a flag and a YAML key; ``--config FILE.yaml`` supplies defaults that
flags on the command line override.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from ..errors import InvalidOptionError
from ..yaml_config import apply_yaml_defaults, config_path

LORA_GROUPS = ("attention", "experts", "dense_mlp", "router")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "upcycled (or dense) model: local folder or Hub id"})
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the model"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the checkpoint's own modeling code"})


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
    lora_target: str = field(
        default="attention,experts,router",
        metadata={"help": f"comma-separated groups ({', '.join(LORA_GROUPS)}) and/or module names to adapt"},
    )
    train_router: bool = field(default=True, metadata={"help": "train the routers fully (with --use_lora)"})
    router_only: bool = field(default=False, metadata={"help": "train only the routers"})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "override the config's aux coef"})
    router_z_loss_coef: float | None = field(default=None, metadata={"help": "override the config's z-loss coef"})
    routing_heatmap: bool = field(default=True, metadata={"help": "save expert_load.png at the end of training"})

    def __post_init__(self):
        if self.use_lora and self.router_only:
            raise InvalidOptionError("use_lora and router_only exclude each other: choose one way to train")
        if self.lora_r < 1:
            raise InvalidOptionError(f"lora_r={self.lora_r} is invalid: expected an integer >= 1")

    @property
    def lora_targets(self) -> list[str]:
        return [t.strip() for t in self.lora_target.split(",") if t.strip()]


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
    return tuple(dataclasses)
