"""Perplexity of a model on one local text file: the same packing and metric as the training recipe."""

from __future__ import annotations

from datasets import DatasetDict, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import InvalidOptionError
from ..evaluation import evaluate_perplexity
from .args import DataArguments
from .data import _builder_for, pack


def evaluate_file(model_path: str, validation_file: str, *, text_column: str = "text", block_size: int = 256,
                  batch_size: int = 8, max_eval_samples: int | None = None, trust_remote_code: bool = False) -> dict:
    """``{"eval_loss", "perplexity", "tokens"}`` of ``model_path`` on ``validation_file``."""
    from pathlib import Path

    if not Path(validation_file).is_file():
        raise InvalidOptionError(f"--validation_file {validation_file} does not exist")
    builder = _builder_for(validation_file)
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    raw = DatasetDict(validation=load_dataset(builder, data_files=validation_file, **kwargs)["train"])
    if text_column not in raw["validation"].column_names:
        raise InvalidOptionError(f"text column {text_column!r} is not in the data; its columns are "
                                 f"{raw['validation'].column_names}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = DataArguments(validation_file=validation_file, text_column=text_column, block_size=block_size,
                         max_eval_samples=max_eval_samples)
    blocks = pack(raw, tokenizer, data)["validation"]
    model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return evaluate_perplexity(model, blocks, batch_size=batch_size)
