"""Perplexity of a model on one local text file: the same packing and metric as the training recipe."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from ..evaluation import evaluate_perplexity
from .args import DataArguments
from .data import check_text_column, load_files, pack


def evaluate_file(model_path: str, validation_file: str, *, text_column: str = "text", block_size: int = 256,
                  batch_size: int = 8, max_eval_samples: int | None = None, trust_remote_code: bool = False) -> dict:
    """``{"eval_loss", "perplexity", "tokens"}`` of ``model_path`` on ``validation_file``."""
    raw = load_files({"validation": validation_file})
    check_text_column(raw["validation"], text_column)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = DataArguments(validation_file=validation_file, text_column=text_column, block_size=block_size,
                         max_eval_samples=max_eval_samples)
    blocks = pack(raw, tokenizer, data)["validation"]
    model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return evaluate_perplexity(model, blocks, batch_size=batch_size)
