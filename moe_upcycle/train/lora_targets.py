"""What ``--lora_target`` names: one table of target groups, each finding its modules or parameters on a model.

A group fills one slot of PEFT's ``LoraConfig``: ``target_modules`` (linear layers that get a LoRA),
``target_parameters`` (the 3-D fused expert tensors: PEFT gives each expert its own low-rank delta) or
``modules_to_save`` (trained fully). Every group works on our upcycled models (``UpcycledMoeForCausalLM`` and
the encoder classes), on native Transformers MoE classes (Mixtral, Qwen2-MoE, Qwen3-MoE, as written by
``moe-upcycle export``) and, where it applies, on dense models. A new group is one entry of
``LORA_TARGET_GROUPS``; anything that is not a group is a linear module name.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters import explain, get_adapter
from ..errors import InvalidOptionError
from ..modeling.modeling_upcycled_moe import UpcycledSparseMoeBlock
from ..modeling.quantized_experts import UpcycledQuantizedExperts

Slot = Literal["target_modules", "target_parameters", "modules_to_save"]


@dataclass(frozen=True)
class LoraTargetGroup:
    """One ``--lora_target`` group.

    Args:
        name: the group's name on the command line.
        help: what it adapts, for ``--help``.
        slot: the ``LoraConfig`` field its names go to.
        find: model -> the module names (or, for ``target_parameters``, parameter names) of the group.
        missing: why nothing matched, completing the sentence "lora_target 'NAME' ...".
        needs_moe: the group exists only in MoE models.
    """

    name: str
    help: str
    slot: Slot
    find: Callable[[nn.Module], list[str]]
    missing: str
    needs_moe: bool = False

    def resolve(self, model: nn.Module) -> list[str]:
        """The group's names in ``model``; raises :class:`InvalidOptionError` when there are none."""
        found = self.find(model)
        if not found:
            raise InvalidOptionError(f"lora_target {self.name!r} {self.missing}")
        return found


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Sparse MoE blocks by path: ours, or a native class's (any module with an ``experts`` child holding 3-D weights)."""
    blocks = {}
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if isinstance(module, UpcycledSparseMoeBlock) or (
            isinstance(experts, nn.Module) and any(p.dim() == 3 for p in experts.parameters(recurse=False))
        ):
            blocks[name] = module
    return blocks


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _inside(name: str, paths: Iterable[str]) -> bool:
    """Whether module ``name`` lies strictly inside one of the modules at ``paths``."""
    return any(name.startswith(path + ".") for path in paths)


VISION_TOWERS = ("vision_tower", "vision_model", "visual")
PROJECTORS = ("multi_modal_projector", "connector")


def vision_parts(model: nn.Module, names: tuple[str, ...] = VISION_TOWERS + PROJECTORS) -> list[str]:
    """Paths of a vision-language model's vision tower and projector (modules whose attribute is one of ``names``)."""
    found = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in names]
    return [name for name in found if not _inside(name, found)]


def _language_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers outside a VLM's vision tower and projector (all of them for a text model)."""
    vision = vision_parts(model)
    return {name: m for name, m in linear_modules(model).items() if not _inside(name, vision)}


def _attention(model: nn.Module) -> list[str]:
    """Linear layers inside a module whose class is named like an attention (``LlamaAttention``, ``GPT2Attention``,
    ``BertAttention``: BERT's attention output projection sits in its ``output``, beside ``self``); in a
    vision-language model, the language model's only."""
    attention = [name for name, m in model.named_modules() if name and "attention" in type(m).__name__.lower()]
    return sorted(name for name in _language_linears(model) if _inside(name, attention))


def _experts(model: nn.Module) -> list[str]:
    """The 3-D expert tensors of every MoE block, named from the block's attribute (``mlp.experts.gate_up_proj``).
    Shared-weight experts have none: their per-expert part is their ``deltas`` (the ``expert_deltas`` group);
    quantised experts have none either: they are frozen integers (QLoRA-style training adapts what surrounds them)."""
    return sorted({
        f"{path.rsplit('.', 1)[-1]}.experts.{name}"
        for path, block in moe_blocks(model).items() if not isinstance(block.experts, UpcycledQuantizedExperts)
        for name, tensor in block.experts.named_parameters(recurse=False) if tensor.dim() == 3
    })


def quantized_experts(model: nn.Module) -> list[str]:
    """Paths of the quantised experts modules (``moe-upcycle quantize``)."""
    return [f"{path}.experts" for path, block in moe_blocks(model).items()
            if isinstance(block.experts, UpcycledQuantizedExperts)]


def expert_deltas(model: nn.Module) -> list[str]:
    """The ``deltas`` module of every shared-weight experts module (``mlp.experts.deltas``): the low-rank part
    each expert owns (``convert --expert-sharing lora``)."""
    return sorted({
        f"{path.rsplit('.', 1)[-1]}.experts.deltas"
        for path, block in moe_blocks(model).items() if isinstance(getattr(block.experts, "deltas", None), nn.Module)
    })


def _adapter_mlp(model: nn.Module) -> re.Pattern | None:
    """The linear layers of a dense feed-forward, as the family's architecture adapter names them (OPT's ``fc1``/``fc2``
    on the layer, BERT's ``intermediate.dense``/``output.dense``), for families ``moe-upcycle convert`` knows."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    if text_config is None or explain(text_config) is not None:
        return None
    adapter = get_adapter(text_config)
    names = {
        (source if adapter.sources_in_layer else f"{adapter.mlp_module_name}.{source}").removesuffix(".weight")
        for tensor in adapter.tensors for source in tensor.sources
    }
    layers = re.escape(adapter.decoder_layers_path)
    return re.compile(rf"(?:^|\.){layers}\.\d+\.(?:{'|'.join(map(re.escape, sorted(names)))})$")


def _dense_mlp(model: nn.Module) -> list[str]:
    """Linear layers of feed-forward blocks left dense: inside a module whose class is named like an MLP
    (``LlamaMLP``, ``Qwen3MoeMLP``) or named by the family's adapter, never inside a MoE block (its shared expert
    and router are not dense MLPs); in a vision-language model, the language model's only."""
    modules = dict(model.named_modules())
    blocks = moe_blocks(model)
    adapter_mlp = _adapter_mlp(model)
    return sorted(
        name for name in _language_linears(model)
        if not _inside(name, blocks)
        and ("mlp" in type(modules[_parent(name)]).__name__.lower()
             or (adapter_mlp is not None and adapter_mlp.search(name)))
    )


def _routers(model: nn.Module) -> list[str]:
    """The router of every MoE block (its ``gate`` or ``router`` child), named from the block's attribute (``mlp.gate``)."""
    return sorted({
        f"{path.rsplit('.', 1)[-1]}.{child}"
        for path, block in moe_blocks(model).items()
        for child in ("gate", "router") if isinstance(getattr(block, child, None), nn.Module)
    })


LORA_TARGET_GROUPS: dict[str, LoraTargetGroup] = {group.name: group for group in (
    LoraTargetGroup("attention", "every linear layer of the attention", "target_modules", _attention,
                    "matched no linear layer inside an attention module"),
    LoraTargetGroup("experts", "the fused expert tensors, one LoRA delta per expert", "target_parameters", _experts,
                    "needs a MoE model with full float experts; this one has no MoE layers, shared-weight experts only "
                    "(their group is expert_deltas) or quantised experts (frozen integers)", needs_moe=True),
    LoraTargetGroup("dense_mlp", "linear layers of the MLPs left dense", "target_modules", _dense_mlp,
                    "matched no linear layer of a dense MLP: every feed-forward of this model is a MoE block "
                    "(or name its linear modules instead)"),
    LoraTargetGroup("router", "the routers, trained fully", "modules_to_save", _routers,
                    "needs a MoE model; this one has no routers", needs_moe=True),
    LoraTargetGroup("expert_deltas", "the low-rank deltas of shared-weight experts, trained fully", "modules_to_save",
                    expert_deltas, "needs a MoE model with shared-weight experts (moe-upcycle convert "
                    "--expert-sharing lora)",
                    needs_moe=True),
)}


def groups_help() -> str:
    """``attention`` (every linear layer of the attention), ``experts`` (...), ... for ``--help``."""
    return ", ".join(f"{group.name} ({group.help})" for group in LORA_TARGET_GROUPS.values())


def _named_modules(model: nn.Module, target: str) -> list[str]:
    """The linear layers called ``target`` (a full name or its last parts, e.g. ``q_proj`` or ``self_attn.q_proj``)."""
    linears = linear_modules(model)
    found = [name for name in linears if name == target or name.endswith("." + target)]
    if not found:
        available = sorted({name.rsplit(".", 1)[-1] for name in linears})
        close = difflib.get_close_matches(target, [*LORA_TARGET_GROUPS, *available], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InvalidOptionError(
            f"lora_target {target!r} matches no module; {hint}groups are {', '.join(LORA_TARGET_GROUPS)} and linear "
            f"module names are {', '.join(available)}"
        )
    return found


def find_targets(model: nn.Module, targets: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Resolve groups and linear module names to ``(target_modules, target_parameters, modules_to_save)``."""
    slots: dict[str, set[str]] = {"target_modules": set(), "target_parameters": set(), "modules_to_save": set()}
    for target in targets:
        group = LORA_TARGET_GROUPS.get(target)
        if group is not None:
            slots[group.slot].update(group.resolve(model))
        else:
            slots["target_modules"].update(_named_modules(model, target))
    return sorted(slots["target_modules"]), sorted(slots["target_parameters"]), sorted(slots["modules_to_save"])
