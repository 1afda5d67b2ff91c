"""What to train: LoRA through PEFT (attention as ``target_modules``, experts as ``target_parameters``,
routers fully trained via ``modules_to_save``), full fine-tuning, or the routers alone."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import InvalidOptionError
from ..modeling.modeling_upcycled_moe import UpcycledMoeForCausalLM, UpcycledSparseMoeBlock
from .args import LORA_GROUPS, MoeArguments


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _moe_blocks(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Sparse MoE blocks by path: ours, or a native class's (any module with an ``experts`` child holding 3-D weights)."""
    blocks = {}
    for name, module in modules.items():
        experts = getattr(module, "experts", None)
        if isinstance(module, UpcycledSparseMoeBlock) or (
            isinstance(experts, nn.Module) and any(p.dim() == 3 for p in experts.parameters(recurse=False))
        ):
            blocks[name] = module
    return blocks


def find_targets(model: nn.Module, targets: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Resolve LoRA target groups and module names to (target_modules, target_parameters, modules_to_save).

    Groups: ``attention`` (every linear layer inside an attention module), ``experts`` (the fused expert
    tensors), ``dense_mlp`` (linear layers of MLPs left dense), ``router`` (trained fully). Anything else
    is a module name that must match at least one linear layer. Works on ``UpcycledMoeForCausalLM`` and
    on native Transformers MoE classes (Mixtral, Qwen2-MoE, ... as written by ``moe-upcycle export``).
    """
    modules = dict(model.named_modules())
    linears = _linear_modules(model)
    moe_blocks = _moe_blocks(modules)
    target_modules: list[str] = []
    target_parameters: list[str] = []
    modules_to_save: list[str] = []
    for target in targets:
        if target == "attention":
            found = [n for n in linears if "attention" in type(modules[_parent(n)]).__name__.lower()]
            if not found:
                raise InvalidOptionError("lora_target 'attention' matched no linear layer inside an attention module")
            target_modules += found
        elif target == "experts":
            if not moe_blocks:
                raise InvalidOptionError("lora_target 'experts' needs a MoE model; this one has no MoE layers")
            names = {
                f"{path.rsplit('.', 1)[-1]}.experts.{p}"
                for path, block in moe_blocks.items()
                for p, tensor in block.experts.named_parameters(recurse=False) if tensor.dim() == 3
            }
            target_parameters += sorted(names)
        elif target == "dense_mlp":
            found = [n for n in linears if _parent(n) not in moe_blocks and not _parent(n).endswith((".gate", ".router"))
                     and "mlp" in type(modules[_parent(n)]).__name__.lower()
                     and not any(_parent(n).startswith(b + ".") for b in moe_blocks)]
            if not found:
                raise InvalidOptionError("lora_target 'dense_mlp' matched nothing: every MLP of this model is a MoE block")
            target_modules += found
        elif target == "router":
            routers = {f"{path.rsplit('.', 1)[-1]}.{child}" for path, block in moe_blocks.items()
                       for child in ("gate", "router") if isinstance(getattr(block, child, None), nn.Module)}
            if not routers:
                raise InvalidOptionError("lora_target 'router' needs a MoE model; this one has no routers")
            modules_to_save += sorted(routers)
        else:
            found = [n for n in linears if n == target or n.endswith("." + target)]
            if not found:
                available = sorted({n.rsplit(".", 1)[-1] for n in linears})
                raise InvalidOptionError(
                    f"lora_target {target!r} matches no module; groups are {', '.join(LORA_GROUPS)} and linear "
                    f"module names are {', '.join(available)}"
                )
            target_modules += found
    return sorted(set(target_modules)), target_parameters, modules_to_save


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


def prepare_model(model: nn.Module, moe: MoeArguments) -> nn.Module:
    """Wrap or freeze ``model`` as ``moe`` asks; print what trains."""
    is_moe = bool(_moe_blocks(dict(model.named_modules())))
    if moe.router_only:
        if not is_moe:
            raise InvalidOptionError("--router_only needs an upcycled MoE model; this model has no routers")
        routers = tuple(f".{r}" for r in find_targets(model, ["router"])[2])  # e.g. ".mlp.gate"
        for name, param in model.named_parameters():
            param.requires_grad = name.rsplit(".", 1)[0].endswith(routers)
    elif moe.use_lora:
        targets = moe.lora_targets
        if moe.train_router and is_moe and "router" not in targets:
            targets = [*targets, "router"]
        if not is_moe:
            wanted = [t for t in targets if t in ("experts", "router")]
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
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    with resolved_targets_kept():
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.merge_and_unload()
