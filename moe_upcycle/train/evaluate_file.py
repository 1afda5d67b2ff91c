"""Perplexity of a model on one local text file: the same packing and metric as the training recipe."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import InvalidOptionError
from ..evaluation import evaluate_perplexity
from .args import DataArguments
from .data import check_text_column, load_files, pack
from .outputs import check_output_file, write_text
from .sources import explained_loading, resolve_model


def evaluate_file(model_path: str, validation_file: str, *, text_column: str = "text", block_size: int = 256,
                  batch_size: int = 8, max_eval_samples: int | None = None, trust_remote_code: bool = False,
                  output_json: str | Path | None = None) -> dict:
    """``{"eval_loss", "perplexity", "tokens"}`` of ``model_path`` on ``validation_file``; also written to
    ``output_json`` when given (checked before the evaluation starts)."""
    if batch_size < 1:
        raise InvalidOptionError(f"batch_size={batch_size} is invalid: expected an integer >= 1")
    data = DataArguments(validation_file=validation_file, text_column=text_column, block_size=block_size,
                         max_eval_samples=max_eval_samples)
    path = resolve_model(model_path, "model")
    if output_json is not None:
        inputs = [p for p in (path, validation_file) if Path(p).exists()]
        check_output_file(Path(output_json), "--output_json", inputs)
    raw = load_files({"validation": validation_file})
    check_text_column(raw["validation"], text_column)
    with explained_loading(path, "its tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path)
    blocks = pack(raw, tokenizer, data)["validation"]
    with explained_loading(path):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    result = evaluate_perplexity(model, blocks, batch_size=batch_size)
    if output_json is not None:
        write_text(Path(output_json), json.dumps(result, indent=2) + "\n", "--output_json")
    return result
