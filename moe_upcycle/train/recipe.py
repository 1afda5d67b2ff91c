"""The training recipe: Trainer + (optionally) PEFT LoRA on an upcycled model, with routing statistics.

    moe-upcycle train --config configs/finetune_demo_lora.yaml
    python scripts/train.py --model_name_or_path out --train_file text.txt --use_lora --output_dir run
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Trainer,
    default_data_collator,
    set_seed,
)

from ..card import write_card
from ..checkpoint import refuse_inputs
from ..errors import InvalidOptionError
from ..evaluation import compute_metrics, preprocess_logits_for_metrics
from ..modeling.modeling_upcycled_moe import UpcycledMoeForCausalLM
from .args import parse_train_args
from .callbacks import RouterBiasCallback, RoutingStatsCallback, compact_console_logs
from .data import load_raw, pack
from .image_text import IMAGE_FIELDS, ImageTextCollator, check_modality, is_vision_language, load_image_text, read_rows
from .lora import base_moe_model, freeze_vision, prepare_model
from .outputs import run_folder
from .sources import explained_loading, resolve_model


def _load_model(path: str, model_args, moe_args, vision: bool = False):
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    with explained_loading(path):
        model = auto.from_pretrained(
            path, revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code
        )
    is_moe = isinstance(model, UpcycledMoeForCausalLM) or hasattr(model.config, "num_experts_per_tok")
    moe_only = [name for name, value in (
        ("--router_only", moe_args.router_only),
        ("--router_aux_loss_coef", moe_args.router_aux_loss_coef is not None),
        ("--router_z_loss_coef", moe_args.router_z_loss_coef is not None),
    ) if value]
    if moe_only and not is_moe:
        raise InvalidOptionError(
            f"{', '.join(moe_only)} need an upcycled MoE model, and {path} is a dense {model.config.model_type} model; "
            "convert it first with `moe-upcycle convert`"
        )
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
        value = getattr(moe_args, name)
        if value is not None:
            setattr(model.config, name, value)
    return model


def _text_data(path: str, model_args, data_args, training_args):
    """(tokenizer, packed blocks, collator) for a causal LM; image rows in JSON data are refused."""
    with explained_loading(path, "its tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with training_args.main_process_first(desc="dataset preparation"):
        raw = load_raw(data_args)
        for file, flag in ((data_args.train_file, "--train_file"), (data_args.validation_file, "--validation_file")):
            columns = {*(raw["train"].column_names or ()), *(raw["validation"].column_names or ())}
            if file and columns & set(IMAGE_FIELDS) and Path(file).suffix.lower() in (".json", ".jsonl"):
                check_modality(read_rows(file, flag), file, flag, path, vision=False)
        blocks = pack(raw, tokenizer, data_args)
    return tokenizer, blocks, default_data_collator


def _image_text_data(path: str, model_args, data_args):
    """(processor, image-text datasets, collator) for a vision-language model, built by its own processor."""
    with explained_loading(path, "its processor (tokenizer and image processor)"):
        processor = AutoProcessor.from_pretrained(path, revision=model_args.model_revision)
    if not hasattr(processor, "image_processor"):
        raise InvalidOptionError(f"{path} is a vision-language model but has no image processor files "
                                 "(preprocessor_config.json): copy them from the source model")
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor, load_image_text(data_args, processor, path), ImageTextCollator(tokenizer.pad_token_id)


def _train(path: str, model_args, data_args, moe_args, training_args) -> tuple[dict[str, float], Trainer]:
    with explained_loading(path, "its config"):
        vision = is_vision_language(AutoConfig.from_pretrained(
            path, revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code))
    if vision:
        processing, blocks, collator = _image_text_data(path, model_args, data_args)
        # Image inputs go through the forward's **kwargs: the Trainer would drop them as unused columns.
        training_args.remove_unused_columns = False
    else:
        processing, blocks, collator = _text_data(path, model_args, data_args, training_args)
    model = _load_model(path, model_args, moe_args, vision)
    if vision and moe_args.freeze_vision:
        freeze_vision(model)
    model = prepare_model(model, moe_args)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        processing_class=processing,
        data_collator=collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    # First, so that the printer and reporters see the moe/* keys it adds.
    trainer.callback_handler.callbacks.insert(0, RoutingStatsCallback(heatmap=moe_args.routing_heatmap))
    trainer.add_callback(RouterBiasCallback())
    compact_console_logs(trainer)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    metrics = trainer.evaluate()
    # eval_loss as in Transformers' examples: the LM loss, whose exp is the perplexity. The Trainer's own
    # eval_loss of a MoE model also holds the weighted router losses; it is kept as eval_total_loss.
    metrics["eval_total_loss"] = metrics["eval_loss"]
    metrics["eval_loss"] = metrics.pop("eval_lm_loss")
    metrics["perplexity"] = metrics.pop("eval_perplexity")
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics, trainer


def run_training(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse arguments, train, evaluate; return the evaluation metrics (also in ``eval_results.json``)."""
    model_args, data_args, moe_args, training_args = parse_train_args(argv)
    # An absolute path for a local model: PEFT records it as the adapter's base model, which `merge` then
    # finds from any directory.
    path = resolve_model(model_args.model_name_or_path, "--model_name_or_path")
    inputs = [p for p in (path, data_args.train_file, data_args.validation_file, data_args.dataset_name) if p and Path(p).exists()]
    refuse_inputs(Path(training_args.output_dir), inputs, "--output_dir", fresh_inside=False)
    set_seed(training_args.seed)
    with run_folder(Path(training_args.output_dir)) as output:
        metrics, trainer = _train(path, model_args, data_args, moe_args, training_args)
        if trainer.is_world_process_zero():
            command = shlex.join(["moe-upcycle", "train", *(sys.argv[1:] if argv is None else argv)])
            (output / "training_recipe.json").write_text(json.dumps({
                "command": command, "model": vars(model_args), "data": vars(data_args), "moe": vars(moe_args),
            }, indent=2, default=str) + "\n")
            if (output / "adapter_config.json").is_file() or isinstance(base_moe_model(trainer.model), UpcycledMoeForCausalLM):
                write_card(output)
    return metrics
