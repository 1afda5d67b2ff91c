"""Configuration of an upcycled Mixture-of-Experts causal language model.

This file is part of the self-contained runtime folder that ``save_pretrained`` copies next to the
weights, so that ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works on a
machine without ``moe_upcycle``: it may import only ``transformers`` and ``torch``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .quantized_experts import PRECISIONS, QUANT_SCHEMES, check_group_size
from .routers import ROUTER_TYPES, ROUTERS

EXPERT_KINDS: tuple[str, ...] = ("glu", "mlp")  # gated down(act(gate(x)) * up(x)), plain down(act(up(x)))
ExpertKind = Literal[EXPERT_KINDS]
RouterType = Literal[ROUTER_TYPES]  # the keys of the routers table
# How experts hold their weights: each its own (``none``), or one shared frozen MLP plus a low-rank delta per expert.
EXPERT_SHARINGS: tuple[str, ...] = ("none", "lora")
ExpertSharing = Literal[EXPERT_SHARINGS]
# The projections a shared-weight expert adapts: the (fused gate and) up projection, and the down projection.
LORA_TARGETS: tuple[str, ...] = ("up", "down")


class UpcycledMoeConfig(PreTrainedConfig):
    r"""Configuration of [`UpcycledMoeForCausalLM`]: a dense causal LM whose feed-forward blocks in
    ``moe_layers`` were replaced by sparse Mixture-of-Experts blocks ("sparse upcycling",
    Komatsuzaki et al. 2023, arXiv 2212.05055).

    The dense model's own configuration is nested, unchanged, as ``text_config``; everything the dense
    model does outside of the replaced MLPs (attention, norms, embeddings, logit scaling) is the dense
    model's own code.

    Args:
        text_config: configuration of the dense source model (any ``AutoModelForCausalLM`` family, an encoder, or a
            vision-language model whose language model has the MoE blocks; :meth:`get_text_config` is the
            language model's config).
        num_experts: routed experts per MoE layer, E.
        num_experts_per_tok: experts selected per token, k (``1 <= k <= E``).
        moe_layers: decoder layer indices whose MLP is a MoE block; ``None`` means every layer.
        expert_intermediate_size: intermediate width I of one expert.
        expert_kind: ``"glu"`` (gated: ``down(act(gate(x)) * up(x))``, weights ``gate_up_proj`` [E, 2I, H])
            or ``"mlp"`` (``down(act(up(x)))``, weights ``up_proj`` [E, I, H]).
        expert_bias: whether expert projections carry biases (GPT-2, GPT-NeoX, ``mlp_bias=True`` Llama).
        expert_sharing: ``"none"`` (every expert owns its weights) or ``"lora"``: the experts share one frozen dense
            MLP and expert e adapts each projection P in ``expert_lora_targets`` by a low-rank delta,
            ``W_P + (expert_lora_alpha / expert_lora_rank) B_{e,P} A_{e,P}`` (MixLoRA, arXiv 2404.15159; PESC,
            arXiv 2401.02731).
        expert_lora_rank: r of the experts' deltas (``expert_sharing="lora"``).
        expert_lora_alpha: alpha of the experts' deltas; the scale is alpha / r.
        expert_lora_targets: projections with a delta: ``"up"`` (the fused gate and up projection of gated
            experts, the up projection of plain ones) and/or ``"down"``.
        expert_precision: per MoE layer (key: the decoder layer index as a string), the precision of each of its
            ``num_experts`` experts, one of ``PRECISIONS``: ``"int8"`` (one scale per output row), ``"int4"`` (one
            scale per ``expert_group_size`` input columns, two values per byte) or ``"float"`` (the model's dtype);
            see ``quantized_experts.py``. Layers not listed, and every layer when ``None``, hold float experts.
        expert_group_size: input columns that share one scale in ``int4`` experts (an even divisor of the hidden
            size and of ``expert_intermediate_size``).
        decoder_layers_path: dotted path of the decoder layer list inside the dense causal-LM module.
        mlp_module_name: attribute name of the feed-forward block inside one decoder layer.
        mlp_activation_attr: attribute of the dense MLP module that holds its activation function.
        mlp_dropout_attr: attribute of the dense MLP module that holds a dropout applied to its output.
        mlp_bypass: modules of a layer (dotted paths relative to it) that become ``nn.Identity`` because the MoE
            block computes them too (families whose feed-forward is not one module: OPT, BERT).
        router_aux_loss_coef: weight of the Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4).
        router_z_loss_coef: weight of the ST-MoE router z-loss (Zoph et al. 2022, eq. 5).
        router_jitter_noise: multiplicative uniform noise ``U(1-eps, 1+eps)`` on router inputs in training.
        router_type: how router logits become expert weights, a key of ``routers.ROUTERS``: ``"topk_renorm"``
            (Mixtral), ``"softmax_topk"`` (Switch / GShard, no renormalisation) or ``"sigmoid"`` (DeepSeek-V3);
            each router class documents its rule.
        router_bias_update_rate: DeepSeek-V3's auxiliary-loss-free balancing speed gamma (``sigmoid`` routers
            only): after every optimizer step each expert's selection bias moves by ``gamma`` towards balance
            (``RouterBiasCallback``). 0 keeps the bias fixed.
        shared_expert_intermediate_size: width of the always-on shared expert (Qwen-MoE, DeepSeekMoE); 0 = none.
            Several shared experts of width I are one shared expert of width n * I.
        shared_expert_gate: scale the shared expert's output by ``sigmoid(x @ w)`` (Qwen2-MoE) instead of 1.
        router_init_std: standard deviation of a freshly initialised router (never all-zero: ties route every
            token to the same experts).
        output_router_logits: return per-layer router logits by default.
        upcycling: the recipe that produced this model (source id, revision, options), for model cards and
            reproducibility.
    """

    model_type: ClassVar[str] = "upcycled_moe"
    sub_configs_defaults: ClassVar[dict] = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values", "cache"]

    text_config: dict | PreTrainedConfig | None = None
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_layers: list[int] | None = None
    expert_intermediate_size: int | None = None
    expert_kind: ExpertKind = "glu"
    expert_bias: bool = False
    expert_sharing: ExpertSharing = "none"
    expert_lora_rank: int = 0
    expert_lora_alpha: float = 0.0
    expert_lora_targets: list[str] | None = None
    expert_precision: dict[str, list[str]] | None = None
    expert_group_size: int = 64
    decoder_layers_path: str = "model.layers"
    mlp_module_name: str = "mlp"
    mlp_activation_attr: str = "act_fn"
    mlp_dropout_attr: str | None = None
    mlp_bypass: list[str] | None = None
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    router_init_std: float = 0.02
    router_type: RouterType = "topk_renorm"
    router_bias_update_rate: float = 0.0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    output_router_logits: bool = False
    upcycling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        text = self.get_text_config()
        num_layers = getattr(text, "num_hidden_layers", None)
        if num_layers is None:
            num_layers = text.n_layer
        if self.moe_layers is None:
            self.moe_layers = list(range(num_layers))
        if self.expert_intermediate_size is None:
            self.expert_intermediate_size = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
        self.validate_moe(num_layers)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The language model's config: ``text_config``, or the text config nested in it when the dense model is a
        vision-language model (its MoE blocks, KV cache and generation follow the language model)."""
        text = super().get_text_config(decoder=decoder, encoder=encoder)
        return text if text is self else text.get_text_config(decoder=decoder, encoder=encoder)

    def expert_precision_of(self, layer: int) -> list[str] | None:
        """The precision of each expert of the MoE block of decoder layer ``layer``; None when its experts are float."""
        return (self.expert_precision or {}).get(str(layer))

    def validate_moe(self, num_layers: int) -> None:
        """Raise ``ValueError`` naming the field, the value and what is allowed."""
        _check(isinstance(self.num_experts, int) and self.num_experts >= 1,
               "num_experts", self.num_experts, "an integer >= 1")
        k = self.num_experts_per_tok
        _check(isinstance(k, int) and 1 <= k <= self.num_experts,
               "num_experts_per_tok", k, f"an integer in [1, num_experts={self.num_experts}]")
        layers = list(self.moe_layers)
        _check(len(layers) > 0, "moe_layers", layers, "at least one layer index")
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
        _check(not bad, "moe_layers", bad, f"layer indices in [0, {num_layers - 1}]")
        _check(len(set(layers)) == len(layers), "moe_layers", layers, "distinct layer indices")
        self.moe_layers = sorted(layers)
        _check(self.expert_kind in EXPERT_KINDS, "expert_kind", self.expert_kind, f"one of {EXPERT_KINDS}")
        _check(self.expert_sharing in EXPERT_SHARINGS, "expert_sharing", self.expert_sharing, f"one of {EXPERT_SHARINGS}")
        if self.expert_sharing == "lora":
            _check(isinstance(self.expert_lora_rank, int) and self.expert_lora_rank >= 1, "expert_lora_rank",
                   self.expert_lora_rank, "an integer >= 1 when expert_sharing='lora'")
            _check(isinstance(self.expert_lora_alpha, (int, float)) and self.expert_lora_alpha > 0, "expert_lora_alpha",
                   self.expert_lora_alpha, "a number > 0")
            targets = self.expert_lora_targets
            _check(isinstance(targets, list) and 0 < len(targets) == len(set(targets)) and set(targets) <= set(LORA_TARGETS),
                   "expert_lora_targets", targets, f"a non-empty list of distinct names from {LORA_TARGETS}")
        _check(isinstance(self.expert_intermediate_size, int) and self.expert_intermediate_size >= 1,
               "expert_intermediate_size", self.expert_intermediate_size, "an integer >= 1")
        self._validate_precision()
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_init_std"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and value >= 0, name, value, "a number >= 0")
        _check(self.router_type in ROUTER_TYPES, "router_type", self.router_type, f"one of {ROUTER_TYPES}")
        rate = self.router_bias_update_rate
        _check(isinstance(rate, (int, float)) and rate >= 0, "router_bias_update_rate", rate, "a number >= 0")
        with_bias = [kind for kind, router in ROUTERS.items() if router.balancing_bias]
        _check(rate == 0 or self.router_type in with_bias, "router_bias_update_rate", rate,
               f"0 unless router_type is one of {with_bias} (routers with a balancing bias)")
        width = self.shared_expert_intermediate_size
        _check(isinstance(width, int) and width >= 0, "shared_expert_intermediate_size", width, "an integer >= 0")
        _check(width > 0 or not self.shared_expert_gate, "shared_expert_gate", self.shared_expert_gate,
               "False when there is no shared expert (shared_expert_intermediate_size=0)")
        eps = self.router_jitter_noise
        _check(isinstance(eps, (int, float)) and 0 <= eps < 1, "router_jitter_noise", eps, "a number in [0, 1)")

    def _validate_precision(self) -> None:
        """``expert_precision`` and ``expert_group_size`` (after ``moe_layers`` and ``expert_intermediate_size``)."""
        group = self.expert_group_size
        _check(check_group_size(None, group) is None, "expert_group_size", group, "an even integer >= 2")
        precision = self.expert_precision
        if precision is None:
            return
        _check(isinstance(precision, dict) and len(precision) > 0, "expert_precision", precision,
               "None or a non-empty dict {layer index as a string: [precision of each expert]}")
        _check(self.expert_sharing == "none", "expert_sharing", self.expert_sharing,
               "'none' when expert_precision is set (quantised experts each store their own weights)")
        layers = [str(i) for i in self.moe_layers]
        bad = [key for key in precision if key not in layers]
        _check(not bad, "expert_precision", bad, f"keys among the MoE layers {layers}")
        for key, names in precision.items():
            _check(isinstance(names, list) and len(names) == self.num_experts and set(names) <= set(PRECISIONS),
                   f"expert_precision[{key!r}]", names,
                   f"a list of num_experts={self.num_experts} names from {PRECISIONS}")
        grouped = {name for names in precision.values() for name in names if name in QUANT_SCHEMES
                   and QUANT_SCHEMES[name].grouped}
        if grouped:
            dims = {"hidden size": self.get_text_config().hidden_size,
                    "expert_intermediate_size": self.expert_intermediate_size}
            reasons = [f"{reason} ({what})" for what, dim in dims.items() if (reason := check_group_size(dim, group))]
            _check(not reasons, "expert_group_size", group,
                   f"a divisor of the experts' input dimensions for {sorted(grouped)} experts, but {'; '.join(reasons)}")


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"UpcycledMoeConfig.{field}={value!r} is invalid: expected {allowed}.")


__all__ = ["UpcycledMoeConfig"]
