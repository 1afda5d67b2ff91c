"""Pick the native target for an upcycled checkpoint, or say why there is no exact one.

Every refusal happens here or in :func:`explain_mismatch`, before any tensor is read or written.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ..modeling.configuration_upcycled_moe import UpcycledMoeConfig
from ..modeling.routers import ROUTERS
from .errors import ExportError
from .targets import NATIVE_TARGETS, TARGET_CHOICES, NativeTarget

_KEEP_OURS = "keep the moe_upcycle format, which loads with trust_remote_code=True"


def _own_language_model(label: str, text_model: str) -> str:
    """Why a VLM whose class builds its own language model (not from ``text_config``'s family) has no native twin."""
    return (f"{label} has no native MoE twin: its model class builds its own dense language model ({text_model}, with "
            f"multimodal rope) whatever its text_config says, and Transformers has no {label} MoE class")


NO_TWIN: Mapping[str, str] = MappingProxyType({
    "gemma": "Gemma has no native MoE twin: no Transformers MoE class has Gemma's decoder (RMSNorm scaled by 1 + weight, "
             "embeddings scaled by sqrt(hidden_size)); Gemma 4's MoE layer is a different block (its router normalises "
             "and rescales its input, experts run beside a dense MLP)",
    "gemma2": "Gemma 2 has no native MoE twin: no Transformers MoE class has its sandwich norms (x(1 + weight)), logit and "
              "attention soft-capping and alternating sliding-window layers",
    "gemma3_text": "Gemma 3 has no native MoE twin: no Transformers MoE class has its sandwich norms (x(1 + weight)), "
                   "q/k norms and local/global rope layers; Gemma 4's MoE layer is a different block",
    "gpt2": "GPT-2 has no native MoE twin: its experts are non-gated MLPs with biases and its layers use LayerNorm and "
            "learned absolute positions, which no Transformers MoE class has",
    "gpt_neox": "GPT-NeoX has no native MoE twin: its experts are non-gated MLPs with biases and its layers add attention "
                "and MLP in parallel with LayerNorm and partial rotary embeddings, which no Transformers MoE class has",
    "qwen2_vl_text": _own_language_model("Qwen2-VL", "Qwen2VLTextModel"),
    "qwen2_5_vl_text": _own_language_model("Qwen2.5-VL", "Qwen2_5_VLTextModel"),
    "phi3": "Phi-3 has no exact native twin: PhiMoE uses LayerNorm (with bias) instead of RMSNorm and sparsemixer routing "
            "instead of softmax top-k, so it would not compute what the upcycled model does",
})
"""Dense families we upcycle that have no exact native MoE class, and why."""

INEXACT_TARGETS: Mapping[str, str] = MappingProxyType({
    "olmoe": "OLMoE is not an exact twin of OLMo 2: OLMoE normalises the inputs of attention and MLP (pre-norm) while "
             "OLMo 2 normalises their outputs inside the residual (post_attention_layernorm, post_feedforward_layernorm); "
             "export OLMo 2 checkpoints with --to flex_olmo",
    "phimoe": NO_TWIN["phi3"],
})
"""Native MoE classes that look like twins of a family we upcycle but compute something else, and why."""


def twin_of(family: str) -> NativeTarget | None:
    """The native target whose exact twin the dense ``family`` is, if any."""
    return next((t for t in NATIVE_TARGETS.values() if family in t.source_families), None)


def resolve_target(family: str, to: str) -> NativeTarget:
    """The target for an upcycled ``family`` checkpoint and a ``--to`` choice; raises :class:`ExportError` saying why not."""
    if to != "auto" and to not in NATIVE_TARGETS:
        if to in INEXACT_TARGETS:
            raise ExportError(f"cannot export to {to!r}: {INEXACT_TARGETS[to]}")
        raise ExportError(f"unknown export target {to!r}: expected one of {', '.join(TARGET_CHOICES)}")
    if family in NO_TWIN:
        raise ExportError(f"cannot export a {family} checkpoint to a native MoE class: {NO_TWIN[family]}; {_KEEP_OURS}")
    twin = twin_of(family)
    if twin is None:
        raise ExportError(f"cannot export a {family} checkpoint: no native Transformers MoE class is an exact twin of "
                          f"{family}; {_KEEP_OURS}")
    if to != "auto" and to != twin.name:
        target = NATIVE_TARGETS[to]
        raise ExportError(f"cannot export a {family} checkpoint to {to!r}: {target.label} is the twin of "
                          f"{', '.join(target.source_families)} only; the twin of {family} is {twin.name!r} (--to auto)")
    return twin


def explain_mismatch(config: UpcycledMoeConfig, target: NativeTarget, dequantize: bool = False) -> str | None:
    """Why the upcycled ``config`` is not exact in ``target`` (experts, layers, dense-only fields), or ``None``;
    ``dequantize``: quantised experts are written as their dequantised float values."""
    text = config.get_text_config()
    for name, rule in target.dense_only_fields.items():
        if not isinstance(rule, str) and getattr(text, name, rule.value) != rule.value:
            return f"{rule.reason} ({name}={getattr(text, name)!r} in the source {text.model_type} config)"
    quantization = getattr(config, "quantization_config", None)
    if quantization:  # e.g. moe-upcycle quantize --backend torchao
        method = (quantization.get("quant_method") if isinstance(quantization, dict)
                  else getattr(quantization, "quant_method", "a quantisation library"))
        return f"its weights are quantised by {method} (no --dequantize for that); export the float model it was " \
               "quantised from"
    if getattr(config, "expert_precision", None) and not dequantize:
        return "its experts are quantised (moe-upcycle quantize) and native MoE classes hold float experts; pass " \
               "--dequantize to write their dequantised values, or export the float model it was quantised from"
    if getattr(config, "expert_sharing", "none") != "none":
        return "its experts share one MLP plus low-rank deltas; fold them into full experts first with " \
               "`moe-upcycle materialize IN OUT`, then export that folder"
    if config.expert_kind != "glu" or config.expert_bias:
        return f"{target.label} experts are gated and unbiased; these are expert_kind={config.expert_kind!r}, " \
               f"expert_bias={config.expert_bias}"
    router_type = getattr(config, "router_type", "topk_renorm")
    if not ROUTERS[router_type].mixtral_compatible:
        return f"{target.label} routers renormalise the softmax top-k weights; this checkpoint's router_type is {router_type!r}"
    if getattr(config, "shared_expert_intermediate_size", 0):
        return "this checkpoint has a shared expert, which the export does not map (keep the upcycled class)"
    num_layers = text.num_hidden_layers
    dense = [i for i in range(num_layers) if i not in config.moe_layers]
    if dense and not target.dense_layers:
        return (f"every {target.label} layer is a MoE layer, but layers {dense} of this checkpoint keep their dense MLP "
                f"(moe_layers={list(config.moe_layers)}); upcycle with layers='all' to export it")
    return target.check(text)


__all__ = ["INEXACT_TARGETS", "NO_TWIN", "explain_mismatch", "resolve_target", "twin_of"]
