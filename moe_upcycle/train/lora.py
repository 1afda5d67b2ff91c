"""What to train: LoRA through PEFT (attention as ``target_modules``, experts as ``target_parameters``,
routers fully trained via ``modules_to_save``: the groups of ``lora_targets``), full fine-tuning, or the routers alone."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..errors import InvalidOptionError
from ..modeling.modeling_upcycled_moe import UpcycledMoeForCausalLM
from .args import MoeArguments
from .lora_targets import (
    LORA_TARGET_GROUPS,
    VISION_TOWERS,
    expert_deltas,
    find_targets,
    moe_blocks,
    quantized_experts,
    vision_parts,
)


@contextmanager
def resolved_targets_kept():
    """Keep PEFT from rewriting already-resolved targets on native MoE model types.

    PEFT (0.21) rewrites ``target_modules`` of native MoE model types with a v4->v5 conversion pattern
    (``mixtral``, ``qwen3_moe``, ...) for adapters written for Transformers v4: every module named like a
    v4 expert projection (``gate_proj``, ``up_proj``, ``w1``...) becomes the fused ``gate_up_proj`` parameter.
    Targets resolved here against the v5 model are already right, and the rewrite would silently drop
    LoRA from the dense MLPs of non-MoE layers.
    """
    from peft.utils import transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def freeze_vision(model: nn.Module) -> list[str]:
    """Freeze a vision-language model's vision tower (``--freeze_vision``); returns its path(s)."""
    towers = vision_parts(model, VISION_TOWERS)
    if not towers:
        raise InvalidOptionError(f"--freeze_vision found no vision tower ({', '.join(VISION_TOWERS)}) in "
                                 f"{type(model).__name__}; pass --freeze_vision false")
    for tower in towers:
        model.get_submodule(tower).requires_grad_(False)
    return towers


def prepare_model(model: nn.Module, moe: MoeArguments) -> nn.Module:
    """Wrap or freeze ``model`` as ``moe`` asks; print what trains.

    Shared-weight experts (``--expert-sharing lora``) keep their shared MLP frozen: without ``--use_lora`` their
    deltas and the routers train; with it, ``experts`` in ``--lora_target`` means their deltas (trained fully and
    saved in the adapter, as the routers are).
    """
    is_moe = bool(moe_blocks(model))
    shared_weights = bool(expert_deltas(model))
    if shared_weights and not moe.use_lora and not moe.router_only:
        trained = tuple(f".{name}." for name in expert_deltas(model) + LORA_TARGET_GROUPS["router"].resolve(model))
        for name, param in model.named_parameters():
            param.requires_grad = any(part in f".{name}" for part in trained)
    elif moe.router_only:
        if not is_moe:
            raise InvalidOptionError("--router_only needs an upcycled MoE model; this model has no routers")
        routers = tuple(f".{r}" for r in LORA_TARGET_GROUPS["router"].resolve(model))  # e.g. ".mlp.gate"
        for name, param in model.named_parameters():
            param.requires_grad = name.rsplit(".", 1)[0].endswith(routers)
    elif moe.use_lora:
        targets = moe.lora_target
        if moe.train_router and is_moe and "router" not in targets:
            targets = [*targets, "router"]
        if shared_weights:  # their experts are adapted by their own deltas
            targets = list(dict.fromkeys("expert_deltas" if t == "experts" else t for t in [*targets, "experts"]))
        if quantized_experts(model) and "experts" in targets:
            targets = [t for t in targets if t != "experts"]
            if not targets:
                raise InvalidOptionError("lora_target experts: this model's experts are quantised (frozen integers, "
                                         "moe-upcycle quantize); adapt attention and the routers (QLoRA-style), or "
                                         "train the float model it was quantised from")
            print("note: the experts are quantised (frozen integers): LoRA adapts "
                  f"{', '.join(targets)} around them (QLoRA-style)")
        if not is_moe:
            wanted = [t for t in targets if t in LORA_TARGET_GROUPS and LORA_TARGET_GROUPS[t].needs_moe]
            if wanted:
                raise InvalidOptionError(
                    f"lora_target {wanted} needs an upcycled MoE model, and {type(model).__name__} is dense; "
                    "convert it first with `moe-upcycle convert`, or adapt only attention/dense_mlp"
                )
        target_modules, target_parameters, modules_to_save = find_targets(model, targets)
        if target_parameters and moe.lora_dropout != 0:
            raise InvalidOptionError(f"lora_dropout={moe.lora_dropout} is invalid with expert targets: PEFT needs 0")
        config = LoraConfig(
            r=moe.lora_r, lora_alpha=moe.lora_alpha, lora_dropout=moe.lora_dropout, task_type="CAUSAL_LM",
            target_modules=target_modules or None, target_parameters=target_parameters or None,
            modules_to_save=modules_to_save or None,
        )
        with resolved_targets_kept():
            model = get_peft_model(model, config)
        _check_every_target_adapted(model, target_modules)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    return model


def _check_every_target_adapted(model: nn.Module, target_modules: list[str]) -> None:
    from peft.tuners.lora import LoraLayer

    adapted = {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    missing = [t for t in target_modules if t not in adapted]
    if missing:
        raise InvalidOptionError(f"PEFT did not adapt {len(missing)} requested module(s), e.g. {missing[:3]}")


def base_moe_model(model: nn.Module) -> UpcycledMoeForCausalLM | None:
    """The ``UpcycledMoeForCausalLM`` inside ``model`` (PEFT- or DDP-wrapped), or ``None``."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    model = getattr(model, "module", model)
    return model if isinstance(model, UpcycledMoeForCausalLM) else None


def merge_adapter(adapter_dir: str, base: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the base model ``base`` (a folder or Hub id) with the adapter in ``adapter_dir`` and merge it into the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from .image_text import is_vision_language

    auto = AutoModelForImageTextToText if is_vision_language(AutoConfig.from_pretrained(base)) else AutoModelForCausalLM
    model = auto.from_pretrained(base, dtype=dtype)
    with resolved_targets_kept():
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.merge_and_unload()
