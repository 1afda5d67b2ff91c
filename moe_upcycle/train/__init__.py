"""Fine-tuning upcycled models with the Hugging Face Trainer, PEFT LoRA and routing statistics."""

from .args import DataArguments, ModelArguments, MoeArguments, parse_train_args
from .callbacks import RoutingStatsCallback
from .recipe import run_training

__all__ = ["DataArguments", "ModelArguments", "MoeArguments", "RoutingStatsCallback", "parse_train_args", "run_training"]
