"""The native Transformers MoE classes an upcycled checkpoint can become, as data (one entry per target).

Each :class:`NativeTarget` says which dense families it is the exact twin of, how our config maps onto
the native config, which dense-config fields the native class lacks (and which values of them are still
exact), how our tensor names map onto the native ones, and whether layers without experts can stay dense.
Twins were verified by comparing logits (``tests/test_export.py``): every native router below computes
softmax top-k renormalised (GraniteMoE: softmax over the top-k logits, the same numbers), as ours does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from transformers import PreTrainedConfig

from ..modeling.configuration_upcycled_moe import UpcycledMoeConfig


@dataclass(frozen=True)
class Require:
    """A dense-config field the native config lacks: exact only while the dense model has ``value``."""

    value: Any
    reason: str


FieldRule = Require | Literal["carry", "ignore"]
"""``Require(value, reason)``; ``"carry"``: keep it as an extra config attribute (the native modeling code
reads it with ``getattr``, e.g. ``head_dim``); ``"ignore"``: the dense model does not use it either."""


@dataclass(frozen=True)
class ExtraTensor:
    """A native tensor with no counterpart in our checkpoint, written as zeros in every MoE layer.

    ``shape`` maps (hidden size H, experts E) to the tensor's shape; ``name`` is relative to the layer's MLP.
    """

    name: str
    shape: Callable[[int, int], tuple[int, ...]]


@dataclass(frozen=True)
class NativeTarget:
    """One native MoE class and how an upcycled checkpoint of one of its dense twins maps onto it.

    Args:
        name: the ``--to`` name, which is also the native ``model_type``.
        label: human-readable class family name used in messages.
        architecture: the native ``*ForCausalLM`` class name (a ``vision_language`` target's VLM class name).
        source_families: dense ``model_type`` values whose upcycled checkpoints are exact in this class.
        moe_fields: our config -> the native config's MoE fields (and fields that override the dense ones).
        dense_only_fields: dense-config fields the native config does not declare, with their rule.
        moe_module: attribute name of the MoE block inside a native decoder layer.
        router_name: name of the router module inside the MoE block.
        dense_layers: whether layers without experts may keep their dense MLP (``mlp_only_layers``).
        extra_tensors: zero tensors the native MoE block has and ours lacks (a disabled shared expert).
        check: dense config -> why it is not exact in this class, or ``None``.
        vision_language: ``name`` is a vision-language model type whose own class holds the language model (Qwen3-VL-MoE):
            the native language model is its ``text_config``, and the source VLM's config is rebuilt as it.
    """

    name: str
    label: str
    architecture: str
    source_families: tuple[str, ...]
    moe_fields: Callable[[UpcycledMoeConfig], dict[str, Any]]
    dense_only_fields: Mapping[str, FieldRule] = field(default_factory=lambda: MappingProxyType({}))
    moe_module: str = "mlp"
    router_name: str = "gate"
    dense_layers: bool = False
    extra_tensors: tuple[ExtraTensor, ...] = ()
    check: Callable[[PreTrainedConfig], str | None] = field(default=lambda text: None)
    vision_language: bool = False

    def renames(self, layers_path: str = "model.layers") -> tuple[tuple[str, str], ...]:
        """Regex renames from our (outer ``model.`` prefix stripped) tensor names to the native names; ``layers_path``:
        the dense model's decoder layers (``model.language_model.layers`` in a vision-language model)."""
        if (self.moe_module, self.router_name) == ("mlp", "gate"):
            return ()
        layer = rf"^({re.escape(layers_path)}\.\d+)\.mlp\."
        return (
            (layer + r"gate\.weight$", rf"\1.{self.moe_module}.{self.router_name}.weight"),
            (layer + r"experts\.", rf"\1.{self.moe_module}.experts."),
        )


def _routing(config: UpcycledMoeConfig) -> dict[str, Any]:
    """Fields every target shares: top-k, the load-balancing coefficient, no router logits by default."""
    return {
        "num_experts_per_tok": config.num_experts_per_tok,
        "router_aux_loss_coef": config.router_aux_loss_coef,
        "output_router_logits": False,
    }


def _mixtral(config: UpcycledMoeConfig) -> dict[str, Any]:
    return {**_routing(config), "num_local_experts": config.num_experts,
            "intermediate_size": config.expert_intermediate_size, "router_jitter_noise": config.router_jitter_noise}


def _qwen_moe(config: UpcycledMoeConfig) -> dict[str, Any]:
    """Qwen2-MoE / Qwen3-MoE / Qwen3-VL-MoE: experts in ``moe_layers``, the dense MLP (``intermediate_size``) elsewhere.
    Qwen3-VL-MoE's routers always renormalise the top-k weights; the others do with ``norm_topk_prob``."""
    num_layers = config.get_text_config().num_hidden_layers
    return {**_routing(config), "num_experts": config.num_experts, "moe_intermediate_size": config.expert_intermediate_size,
            "decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(num_layers) if i not in config.moe_layers]}


def _qwen2_moe(config: UpcycledMoeConfig) -> dict[str, Any]:
    # A shared expert of width 0 outputs zeros: the block is exactly the routed experts.
    return {**_qwen_moe(config), "norm_topk_prob": True, "shared_expert_intermediate_size": 0, "qkv_bias": True}


def _qwen3_moe(config: UpcycledMoeConfig) -> dict[str, Any]:
    # Qwen3-MoE slides the window on every layer or on none (checked by ``_qwen3_uniform_window``).
    layer_types = getattr(config.get_text_config(), "layer_types", None) or []
    return {**_qwen_moe(config), "norm_topk_prob": True,
            "use_sliding_window": bool(layer_types) and all(t == "sliding_attention" for t in layer_types)}


def _qwen3_uniform_window(text: PreTrainedConfig) -> str | None:
    layer_types = list(getattr(text, "layer_types", None) or [])
    sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    if sliding and len(sliding) != len(layer_types):
        return (f"Qwen3-MoE applies the sliding window to every layer or to none, but this Qwen3 slides it on layers "
                f"{sliding} only (use_sliding_window=True, max_window_layers={getattr(text, 'max_window_layers', None)})")
    return None


def _flex_olmo(config: UpcycledMoeConfig) -> dict[str, Any]:
    return {**_routing(config), "num_experts": config.num_experts, "intermediate_size": config.expert_intermediate_size,
            "norm_topk_prob": True}


def _granitemoe(config: UpcycledMoeConfig) -> dict[str, Any]:
    return {**_routing(config), "num_local_experts": config.num_experts, "intermediate_size": config.expert_intermediate_size}


_TARGETS: tuple[NativeTarget, ...] = (
    NativeTarget(
        name="mixtral", label="Mixtral", architecture="MixtralForCausalLM", source_families=("llama", "mistral"),
        moe_fields=_mixtral,
        dense_only_fields=MappingProxyType({
            "attention_bias": Require(False, "Mixtral's attention projections have no biases"),
            "mlp_bias": Require(False, "Mixtral's experts have no biases"),
            "pretraining_tp": "ignore",  # Transformers 5 Llama ignores it too
        }),
    ),
    NativeTarget(
        name="qwen2_moe", label="Qwen2-MoE", architecture="Qwen2MoeForCausalLM", source_families=("qwen2",),
        moe_fields=_qwen2_moe, dense_layers=True,
        extra_tensors=(
            ExtraTensor("shared_expert.gate_proj.weight", lambda h, e: (0, h)),
            ExtraTensor("shared_expert.up_proj.weight", lambda h, e: (0, h)),
            ExtraTensor("shared_expert.down_proj.weight", lambda h, e: (h, 0)),
            ExtraTensor("shared_expert_gate.weight", lambda h, e: (1, h)),
        ),
    ),
    NativeTarget(
        name="qwen3_moe", label="Qwen3-MoE", architecture="Qwen3MoeForCausalLM", source_families=("qwen3",),
        moe_fields=_qwen3_moe, dense_layers=True, check=_qwen3_uniform_window,
        dense_only_fields=MappingProxyType({"head_dim": "carry", "layer_types": "ignore", "max_window_layers": "ignore"}),
    ),
    NativeTarget(
        name="qwen3_vl_moe", label="Qwen3-VL-MoE", architecture="Qwen3VLMoeForConditionalGeneration",
        source_families=("qwen3_vl_text",), moe_fields=_qwen_moe, dense_layers=True, vision_language=True,
    ),
    NativeTarget(
        name="flex_olmo", label="FlexOlmo", architecture="FlexOlmoForCausalLM", source_families=("olmo2",),
        moe_fields=_flex_olmo,
    ),
    NativeTarget(
        name="granitemoe", label="GraniteMoE", architecture="GraniteMoeForCausalLM", source_families=("granite",),
        moe_fields=_granitemoe, moe_module="block_sparse_moe", router_name="router",
        dense_only_fields=MappingProxyType({"mlp_bias": Require(False, "GraniteMoE's experts have no biases")}),
    ),
)



def _index(targets: tuple[NativeTarget, ...]) -> Mapping[str, NativeTarget]:
    """Targets by name; a name or a source family claimed twice is a programming error."""
    names = [t.name for t in targets]
    families = [f for t in targets for f in t.source_families]
    for kind, values in (("target name", names), ("source family", families)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"{kind} {repeated} appears twice in the export target table")
    return MappingProxyType({t.name: t for t in targets})


NATIVE_TARGETS: Mapping[str, NativeTarget] = _index(_TARGETS)
"""Every export target by its ``--to`` name (also its native ``model_type``)."""

TARGET_CHOICES: tuple[str, ...] = ("auto", *NATIVE_TARGETS)

__all__ = ["NATIVE_TARGETS", "TARGET_CHOICES", "ExtraTensor", "FieldRule", "NativeTarget", "Require"]
