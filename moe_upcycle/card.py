"""Model cards rendered from the files a run produced (config, safetensors headers, eval results).

Every figure in a card is read from the output folder it describes, never typed in: parameter counts
from the safetensors headers, the recipe from ``config.json`` (``upcycling``), metrics from
``eval_results.json``, the expert-load heatmap from ``expert_load.png``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .checkpoint import SafetensorsCheckpoint
from .errors import UpcycleError
from .modeling.quantized_experts import QUANT_SCHEMES, scheme_summary
from .modeling.routers import ROUTERS


def _templates_dir() -> Path:
    """``model_cards/`` of the repository (source or editable install), else the copy a wheel installs."""
    checkout = Path(__file__).resolve().parents[1] / "model_cards"
    return checkout if checkout.is_dir() else Path(sys.prefix) / "share" / "moe-upcycle" / "model_cards"


TEMPLATE = _templates_dir() / "upcycled_moe.md"
ADAPTER_TEMPLATE = _templates_dir() / "lora_adapter.md"
CARD_FILE = "README.md"
TAGS = ["moe", "mixture-of-experts", "upcycled", "moe-upcycle"]


class CardError(UpcycleError, ValueError):
    """No card can be rendered for the folder: it is not an upcycled MoE model or LoRA adapter folder."""


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


_QUANTIZED = re.compile(rf"_(?P<scheme>{'|'.join(QUANT_SCHEMES)})(?P<scale>_scale)?$")


# torchao's flattened tensors of a quantised parameter (``quantize --backend torchao``): int8 codes, and per row a
# scale and a zero point.
_TORCHAO_EXTRA = re.compile(r"\._\w+_(scale|zero_point)$")


def _weights_held(name: str, shape: tuple[int, ...]) -> int:
    """Parameters a stored tensor holds: quantised experts count their weights (int4: two per byte), not their bytes
    or scales."""
    if ".experts." in name and _TORCHAO_EXTRA.search(name):
        return 0
    stored = _QUANTIZED.search(name) if ".experts." in name else None
    if stored is None:
        return math.prod(shape)
    return 0 if stored["scale"] else math.prod(shape) * 8 // QUANT_SCHEMES[stored["scheme"]].bits


def _per_expert_numel(folder: Path) -> tuple[int, int]:
    """(all parameters, those that belong to one expert each): every experts tensor, or with shared-weight experts
    only their low-rank deltas (``*_lora_A`` / ``*_lora_B``; the shared MLP runs for every token)."""
    numel = {name: _weights_held(name, t.shape) for name, t in SafetensorsCheckpoint(folder).info.items()}
    experts = {name: n for name, n in numel.items() if ".experts." in name}
    deltas = {name: n for name, n in experts.items() if "_lora_" in name}
    return sum(numel.values()), sum((deltas or experts).values())


def parameter_counts(folder: Path, num_experts: int, top_k: int) -> tuple[int, int]:
    """(total, active per token) parameters, counted from the safetensors headers in ``folder``.

    Tied weights are stored, and counted, once; of each layer's experts, ``top_k / num_experts`` are active.
    """
    total, per_expert = _per_expert_numel(folder)
    return total, total - per_expert * (num_experts - top_k) // num_experts


def source_license(source_folder: Path) -> str | None:
    """The ``license`` in the source model's card metadata, if it has a card."""
    card = source_folder / CARD_FILE
    if not card.is_file():
        return None
    try:
        return ModelCard.load(card).data.license
    except Exception:  # a malformed source card must not stop a conversion
        return None


def _metrics_table(folder: Path) -> str | None:
    results = _read_json(folder / "eval_results.json")
    if not results:
        return None
    rows = [f"| {key} | {results[key]:.4f} |" for key in ("eval_loss", "perplexity") if key in results]
    if not rows:
        return None
    note = "Validation of the training run (`eval_results.json`); eval_loss is the LM loss in nats per token."
    return "\n".join([note, "", "| metric | value |", "| --- | ---: |", *rows])


def _names(value: str | list[str]) -> str:
    """A recorded list of names as text (older records hold one comma-separated string)."""
    return ", ".join(value) if isinstance(value, list) else str(value)


def _training_section(folder: Path) -> tuple[str | None, str | None]:
    """(markdown, reproduce command) from ``training_recipe.json`` and ``trainer_state.json``."""
    recipe = _read_json(folder / "training_recipe.json")
    if recipe is None:
        return None, None
    state = _read_json(folder / "trainer_state.json") or {}
    moe, data = recipe.get("moe", {}), recipe.get("data", {})
    how = "LoRA (PEFT)" if moe.get("use_lora") else "router only" if moe.get("router_only") else "full fine-tuning"
    lines = [
        f"Fine-tuned with the Hugging Face `Trainer`: {how}"
        + (f", LoRA r={moe['lora_r']} alpha={moe['lora_alpha']} on {_names(moe['lora_target'])}" if moe.get("use_lora") else "")
        + f"; {state.get('global_step', '?')} optimizer steps of {data.get('block_size')}-token blocks"
        + f" from `{data.get('dataset_name') or data.get('train_file')}`.",
    ]
    command = recipe.get("command")
    return "\n".join(lines), command


def _quantization_section(config: dict[str, Any]) -> str | None:
    """How the experts are stored, from ``expert_precision`` and the ``quantized`` record of ``moe-upcycle quantize``."""
    precision = config.get("expert_precision")
    record = (config.get("upcycling") or {}).get("quantized") or {}
    if record.get("backend") == "torchao":
        return (f"The experts are stored by torchao {record.get('torchao_version', '')} as int8 weight-only tensors "
                "(`moe-upcycle quantize --backend torchao`: `Int8WeightOnlyConfig`, one scale per output row, applied "
                "through Transformers' `TorchAoConfig` to the expert parameters only; routers, attention, norms and "
                f"embeddings are unchanged), {record.get('average_bits', '?')} bits per expert weight on average, "
                "scales and zero points included. Loading needs torchao (`pip install torchao`) and runs the "
                f"`{record.get('experts_implementation', 'eager')}` experts kernel, pinned in config.json "
                "(`experts_implementation`): torchao's tensors do not run the fused kernels. This model does not "
                "compute exactly what its float source did.")
    if not precision:
        return None
    lines = [f"The experts are stored as integers with scales (`moe-upcycle quantize`; routers, attention, norms and "
             f"embeddings are unchanged): {scheme_summary(precision)}, "
             f"{record.get('average_bits', '?')} bits per expert weight on average, scales included "
             f"(int8: one scale per output row; int4 and int2: one scale per {config.get('expert_group_size')} input "
             "columns). The integer weights are what runs: this model does not compute exactly what its float source "
             "did."]
    if record.get("scheme") == "auto":
        lines += ["", f"Precision chosen per expert (MC-MoE style) from the routing of `{record.get('data')}`, for at most "
                      f"{record.get('target_bits')} bits on average: the experts whose rounding changes the layer's "
                      "output most (usage included) keep more bits.", "",
                  "| MoE layer | precision of experts 0, 1, ... |", "| --- | --- |",
                  *(f"| {layer} | {', '.join(row)} |" for layer, row in precision.items())]
    return "\n".join(lines)


def _render(template: Path, folder: Path, repo_id: str | None, base: str, *, library: str, relation: str,
            location: str | None = None,
            tags: list[str], license: str | None = None, pipeline_tag: str = "text-generation", **values) -> ModelCard:
    """Fill ``template`` with metadata (``base_model`` only when ``base`` is a Hub id) and ``values``."""
    card_data = ModelCardData(
        base_model=base if "/" in base and not Path(base).exists() else None, library_name=library,
        pipeline_tag=pipeline_tag, license=license, tags=tags, model_name=repo_id or Path(location or folder).name,
    )
    card_data.base_model_relation = relation
    return ModelCard.from_template(
        card_data, template_path=str(template), model_name=repo_id or Path(location or folder).name,
        repo_id=repo_id or str(location or folder),
        base_model=base, base_model_url=f"https://huggingface.co/{base}" if card_data.base_model else None, **values,
    )


# (pipeline tag, Auto class, our class) of a checkpoint whose auto_map names that Auto class; else an encoder.
_CARD_KINDS = (("image-text-to-text", "AutoModelForImageTextToText", "UpcycledMoeForImageTextToText"),
               ("text-generation", "AutoModelForCausalLM", "UpcycledMoeForCausalLM"))


def render_card(folder: str | Path, repo_id: str | None = None, location: str | None = None) -> ModelCard:
    """Render the card of an upcycled model folder (converted, merged or fully fine-tuned).

    ``location``: where the folder will live (the card's loading snippet names it when there is no repo id),
    for cards written inside a temporary folder that is renamed afterwards.
    """
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return render_adapter_card(folder, repo_id)
    config = _read_json(folder / "config.json")
    if config is None or config.get("model_type") != "upcycled_moe":
        raise CardError(f"{folder} is not an upcycled MoE model folder (config.json with model_type upcycled_moe), so no "
                        f"card can be generated for it: write its {CARD_FILE} yourself")
    recipe = config.get("upcycling") or {}
    text = config["text_config"]
    num_experts, top_k = config["num_experts"], config["num_experts_per_tok"]
    total, active = parameter_counts(folder, num_experts, top_k)
    base = recipe.get("source", "unknown")
    training, train_command = _training_section(folder)
    # The converter records every option and why the result is not exact; the card reads both, decides nothing.
    convert_command = recipe.get("reproduce")  # written by the command that made the checkpoint
    quantize_command = (recipe.get("quantized") or {}).get("command")
    inexact = recipe.get("inexact_reasons")  # None: converted before the record existed, exactness unknown
    auto_map = config.get("auto_map") or {"AutoModelForCausalLM": None}
    pipeline, auto_class, model_class = next(
        (kind for kind in _CARD_KINDS if kind[1] in auto_map), ("feature-extraction", "AutoModel", "UpcycledMoeModel"))
    language = text.get("text_config") or text  # a vision-language source's language model
    return _render(
        TEMPLATE, folder, repo_id, base, library="transformers", relation="finetune", tags=TAGS, location=location,
        pipeline_tag=pipeline, auto_class=auto_class, model_class=model_class,
        license=recipe.get("license"),
        revision=recipe.get("revision"),
        source_model_type=text.get("model_type"),
        num_experts=num_experts,
        top_k=top_k,
        num_layers=language.get("num_hidden_layers", language.get("n_layer")),
        moe_layers=", ".join(map(str, config["moe_layers"])),
        moe_layer_count=len(config["moe_layers"]),
        layer_spec=recipe.get("layers", "all"),
        expert_noise=recipe.get("expert_noise", 0.0),
        drop_ratio=recipe.get("drop_upcycling_ratio", 0.0),
        router_init_std=config.get("router_init_std"),
        router=ROUTERS[config.get("router_type", "topk_renorm")].summary,
        router_init=recipe.get("router_init", "random"),
        granularity=recipe.get("granularity", 1),
        shared_width=config.get("shared_expert_intermediate_size", 0),
        lora_rank=config.get("expert_lora_rank") if config.get("expert_sharing") == "lora" else None,
        lora_targets=", ".join(config.get("expert_lora_targets") or []),
        delta_params=f"{_per_expert_numel(folder)[1]:,}",
        shared_gate=config.get("shared_expert_gate", False),
        expert_width=config.get("expert_intermediate_size"),
        aux_coef=config.get("router_aux_loss_coef"),
        z_coef=config.get("router_z_loss_coef"),
        total_params=f"{total:,}",
        active_params=f"{active:,}",
        dtype=config.get("dtype") or text.get("dtype"),
        exact=inexact == [] and training is None,
        inexact_reasons="; ".join(inexact or []),
        training=training,
        quantization=_quantization_section(config),
        metrics=_metrics_table(folder),
        heatmap="expert_load.png" if (folder / "expert_load.png").is_file() else None,
        commands="\n".join(c for c in (convert_command, quantize_command, train_command) if c),
    )


def render_adapter_card(folder: Path, repo_id: str | None = None) -> ModelCard:
    """Card of a LoRA adapter folder: names the base MoE model, the LoRA set-up and the measured metrics."""
    adapter = _read_json(folder / "adapter_config.json") or {}
    base = adapter.get("base_model_name_or_path") or "unknown"
    training, train_command = _training_section(folder)
    return _render(
        ADAPTER_TEMPLATE, folder, repo_id, base, library="peft", relation="adapter", tags=[*TAGS, "lora"],
        lora_r=adapter.get("r"),
        lora_alpha=adapter.get("lora_alpha"),
        target_modules=adapter.get("target_modules"),
        target_parameters=adapter.get("target_parameters"),
        modules_to_save=adapter.get("modules_to_save"),
        training=training,
        metrics=_metrics_table(folder),
        heatmap="expert_load.png" if (folder / "expert_load.png").is_file() else None,
        commands=train_command or "",
    )


def write_card(folder: str | Path, repo_id: str | None = None, location: str | None = None) -> Path:
    """Render and save ``README.md`` in ``folder``."""
    path = Path(folder) / CARD_FILE
    render_card(folder, repo_id, location).save(path)
    return path
