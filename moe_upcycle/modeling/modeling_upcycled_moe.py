"""Upcycled sparse Mixture-of-Experts causal LM: a dense Transformers model whose chosen MLPs are MoE blocks.

Part of the self-contained runtime folder: ``save_pretrained`` copies this file and its relative imports
next to the weights (``auto_map``), so it imports only ``torch``, ``transformers`` and its siblings.

Layout (the same as Transformers' native MoE models, e.g. Mixtral):

- router ``mlp.gate.weight`` [E, H]
- gated experts ``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first, then up) and ``mlp.experts.down_proj`` [E, H, I]
- plain experts ``mlp.experts.up_proj`` [E, I, H] and ``mlp.experts.down_proj`` [E, H, I], with ``*_bias`` [E, out]
- quantised experts (layers listed in ``config.expert_precision``): each projection split by the precision of its
  experts, ``mlp.experts.gate_up_proj_int8`` / ``_int4`` with ``*_scale``, see quantized_experts.py

The experts classes are decorated with ``use_experts_implementation`` so any registered experts kernel runs
them: by default ``upcycled_default`` (our ``sorted_mm`` on CPU, Transformers' ``grouped_mm`` on accelerators),
or ``grouped_mm`` / ``batched_mm`` / ``sorted_mm`` by name; ``eager`` is the reference loop (fast_experts.py).
Quantised experts run the ``quantized`` kernel, or their eager reference under ``eager``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
    MODEL_FOR_MASKED_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    MODEL_MAPPING,
)

from .configuration_upcycled_moe import UpcycledMoeConfig
from .fast_experts import eager_experts_loop, sorted_experts_forward
from .lora_experts import UpcycledLoraExperts, shared_lora_experts_forward
from .moe_losses import RoutingStats, load_balancing_loss, router_z_loss
from .quantized_experts import UpcycledQuantizedExperts, quantized_experts_forward
from .routers import ROUTERS, Router


def default_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The default experts kernel, chosen per call by device: ``sorted_mm`` on CPU, where it measured fastest
    (scripts/bench_moe_layer.py), Transformers' ``grouped_mm`` on accelerators. [T, H], [T, k], [T, k] -> [T, H]."""
    kernel = sorted_experts_forward if hidden_states.device.type == "cpu" else ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    return kernel(self, hidden_states, top_k_index, top_k_weights)


# Our experts kernels, beside Transformers' ``eager`` / ``grouped_mm`` / ``batched_mm``: ``sorted_mm`` (sort by
# expert once, contiguous per-expert matmuls, one custom backward; see fast_experts.py) and the default above.
DEFAULT_EXPERTS_IMPLEMENTATION = "upcycled_default"
ALL_EXPERTS_FUNCTIONS.register("sorted_mm", sorted_experts_forward)
ALL_EXPERTS_FUNCTIONS.register(DEFAULT_EXPERTS_IMPLEMENTATION, default_experts_forward)
ALL_EXPERTS_FUNCTIONS.register("shared_lora", shared_lora_experts_forward)
ALL_EXPERTS_FUNCTIONS.register("quantized", quantized_experts_forward)

# The one experts kernel torchao-quantised experts run with (``quantize --backend torchao``): torchao's ``Int8Tensor``
# supports indexing and ``linear``, not the transposes and batched matmuls of the fused kernels.
TORCHAO_EXPERTS_IMPLEMENTATION = "eager"


def _torchao_quantized(config) -> bool:
    """Whether ``config`` describes weights quantised by torchao (its ``quantization_config``, object or dict)."""
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    return str(getattr(method, "value", method)) == "torchao"


# Every upcycled class keeps the dense model (with the MoE blocks swapped in) at ``self.model``, so checkpoint
# tensor names are the dense model's behind this prefix.
DENSE_PREFIX = "model."

# The KV cache field of model outputs: ``cache`` from Transformers 5.24, ``past_key_values`` before.
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class _ExpertsBase(nn.Module):
    """Experts stored as 3-D tensors; ``forward`` is the eager reference loop over active experts.

    Gated: ``gate_up_proj`` [E, 2I, H]; plain: ``up_proj`` [E, I, H]; both: ``down_proj`` [E, H, I];
    with biases, ``<name>_bias`` [E, out].
    """

    def __init__(self, config: UpcycledMoeConfig, act_fn: nn.Module, *, gated: bool, bias: bool):
        super().__init__()
        E, H, I = config.num_experts, config.get_text_config().hidden_size, config.expert_intermediate_size
        std = getattr(config.get_text_config(), "initializer_range", 0.02)
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, I
        up_name, up_dim = ("gate_up_proj", 2 * I) if gated else ("up_proj", I)
        for name, shape in ((up_name, (E, up_dim, H)), ("down_proj", (E, H, I))):
            setattr(self, name, nn.Parameter(torch.empty(*shape).normal_(std=std)))
            if bias:
                setattr(self, f"{name}_bias", nn.Parameter(torch.zeros(E, shape[1])))
        self.act_fn = act_fn

    def _project(self, name: str, x: torch.Tensor, expert: int) -> torch.Tensor:
        out = F.linear(x, getattr(self, name)[expert])
        if self.has_bias:
            out = out + getattr(self, f"{name}_bias")[expert]
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]."""
        return eager_experts_loop(self._project, hidden_states, top_k_index, top_k_weights,
                                  num_experts=self.num_experts, act_fn=self.act_fn, has_gate=self.has_gate)


@use_experts_implementation
class UpcycledGluExperts(_ExpertsBase):
    """Gated experts: ``down(act(x @ gate.T) * (x @ up.T))``."""

    def __init__(self, config: UpcycledMoeConfig, act_fn: nn.Module):
        super().__init__(config, act_fn, gated=True, bias=False)


@use_experts_implementation(has_bias=True)
class UpcycledGluBiasExperts(_ExpertsBase):
    """Gated experts with biases (Llama/Granite ``mlp_bias=True``)."""

    def __init__(self, config: UpcycledMoeConfig, act_fn: nn.Module):
        super().__init__(config, act_fn, gated=True, bias=True)


@use_experts_implementation(has_gate=False, has_bias=True)
class UpcycledMlpExperts(_ExpertsBase):
    """Non-gated experts with biases (GPT-2, GPT-NeoX): ``down(act(x @ up.T + b_up)) + b_down``."""

    def __init__(self, config: UpcycledMoeConfig, act_fn: nn.Module):
        super().__init__(config, act_fn, gated=False, bias=True)


@use_experts_implementation(has_gate=False)
class UpcycledMlpNoBiasExperts(_ExpertsBase):
    """Non-gated experts without biases (Falcon ``bias=False``, StarCoder2 ``use_bias=False``): ``down(act(up(x)))``."""

    def __init__(self, config: UpcycledMoeConfig, act_fn: nn.Module):
        super().__init__(config, act_fn, gated=False, bias=False)


def experts_class(config: UpcycledMoeConfig) -> type[nn.Module]:
    """The float experts class for ``config.expert_sharing`` / ``config.expert_kind`` / ``config.expert_bias``."""
    if config.expert_sharing == "lora":
        return UpcycledLoraExperts
    if config.expert_kind == "mlp":
        return UpcycledMlpExperts if config.expert_bias else UpcycledMlpNoBiasExperts
    return UpcycledGluBiasExperts if config.expert_bias else UpcycledGluExperts


def build_experts(config: UpcycledMoeConfig, act_fn: nn.Module, layer: int | None = None) -> nn.Module:
    """The experts of the MoE block of decoder layer ``layer``: quantised where ``config.expert_precision`` lists the
    layer, else :func:`experts_class`'s (also when ``layer`` is None: a block built outside a model)."""
    if layer is not None and config.expert_precision_of(layer) is not None:
        return UpcycledQuantizedExperts(config, act_fn, layer)
    return experts_class(config)(config, act_fn)


class UpcycledSharedExpert(nn.Module):
    """Always-on expert (Qwen-MoE; DeepSeekMoE, Dai et al. 2024, arXiv 2401.06066) of width
    ``config.shared_expert_intermediate_size``, with the dense MLP's form: gated ``down(act(gate(x)) * up(x))``
    or plain ``down(act(up(x)))``, biased like the routed experts.
    """

    def __init__(self, config: UpcycledMoeConfig, act_fn: nn.Module):
        super().__init__()
        H, I = config.get_text_config().hidden_size, config.shared_expert_intermediate_size
        bias = config.expert_bias
        self.gate_proj = nn.Linear(H, I, bias=bias) if config.expert_kind == "glu" else None
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x) if self.gate_proj is not None else self.act_fn(self.up_proj(x))
        return self.down_proj(h)


class UpcycledSparseMoeBlock(nn.Module):
    """Drop-in replacement of a dense MLP: route each token to k of E experts and mix their outputs.

    ``y = sum_{e in topk(x)} w_e(x) * expert_e(x) [+ g(x) * shared(x)]`` with ``w`` from the router
    (a :class:`~.routers.Router` of the configured kind) and ``g(x) = sigmoid(x @ shared_expert_gate^T)`` or 1.
    """

    def __init__(self, config: UpcycledMoeConfig, *, act_fn: nn.Module, dropout: nn.Module | None = None,
                 layer: int | None = None):
        """``layer``: the decoder layer this block replaces the MLP of (picks its experts' precision)."""
        super().__init__()
        self.jitter_noise = config.router_jitter_noise
        self.gate = ROUTERS[config.router_type](config.num_experts, config.get_text_config().hidden_size,
                                                config.num_experts_per_tok, config.router_init_std)
        self.experts = build_experts(config, act_fn, layer)
        self.shared_expert = UpcycledSharedExpert(config, act_fn) if config.shared_expert_intermediate_size else None
        hidden = config.get_text_config().hidden_size
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if config.shared_expert_gate else None
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [..., H] -> [..., H]."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        router_input = x
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            router_input = x * noise
        _, top_weights, top_indices = self.gate(router_input)
        out = self.experts(x, top_indices, top_weights.to(x.dtype))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return self.dropout(out.reshape(shape))


def install_moe_blocks(model: nn.Module, config: UpcycledMoeConfig) -> tuple[UpcycledSparseMoeBlock, ...]:
    """Replace, in place, the feed-forward of each layer in ``config.moe_layers`` of the dense ``model`` by a MoE block.

    The block takes the dense MLP's place (``mlp_module_name``) and its activation (an attribute of the MLP, or
    of the layer for families without an MLP module); modules listed in ``mlp_bypass`` become ``nn.Identity``
    because the block already computes them (OPT's activation and ``fc2``, BERT's ``output.dense``).
    """
    layers = model.get_submodule(config.decoder_layers_path)
    blocks = []
    for index in config.moe_layers:
        layer = layers[index]
        dense_mlp = getattr(layer, config.mlp_module_name)
        act_fn = getattr(dense_mlp, config.mlp_activation_attr, None)
        if act_fn is None:
            act_fn = getattr(layer, config.mlp_activation_attr)
        dropout = getattr(dense_mlp, config.mlp_dropout_attr) if config.mlp_dropout_attr else None
        block = UpcycledSparseMoeBlock(config, act_fn=act_fn, dropout=dropout, layer=index)
        setattr(layer, config.mlp_module_name, block)
        for path in config.mlp_bypass or ():
            parent, _, name = path.rpartition(".")
            setattr(layer.get_submodule(parent), name, nn.Identity())
        blocks.append(block)
    return tuple(blocks)


def _dense_model(mapping, config: UpcycledMoeConfig) -> PreTrainedModel:
    """The dense model of ``config.text_config`` from an Auto mapping (its class for that config type).

    ``from_pretrained(..., experts_implementation=...)`` hands the kernel name to sub-configs too; the dense
    model has no experts, and Transformers refuses an explicit ``grouped_mm`` for a class without them, so
    its config gets no request (our experts read the outer config).
    """
    dense = config.text_config
    for sub in (dense, *(getattr(dense, key, None) for key in dense.sub_configs)):
        if sub is not None:
            sub._experts_implementation_internal = None
    if type(dense) not in mapping:
        raise ValueError(f"this upcycled checkpoint holds a {dense.model_type} model, which this class cannot build; "
                         f"load it with the Auto class its config.json's auto_map names")
    return mapping[type(dense)](dense)


class UpcycledMoePreTrainedModel(PreTrainedModel):
    config_class = UpcycledMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    # The dense subtree is initialised by the dense model's own ``_init_weights``; routers and experts are
    # initialised in their constructors.
    # ``self._moe_blocks``: a plain tuple (not registered again as submodules) set by ``install_moe_blocks``.

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """No request means ``upcycled_default`` (``sorted_mm`` on CPU, ``grouped_mm`` elsewhere), not ``grouped_mm``.

        Experts quantised by torchao (``quantize --backend torchao``) run only the eager loop: no request (or the
        default) means ``eager`` there, and another kernel is refused in one line.
        """
        if _torchao_quantized(self.config):
            if requested_experts not in (None, DEFAULT_EXPERTS_IMPLEMENTATION, TORCHAO_EXPERTS_IMPLEMENTATION):
                raise ValueError(f"experts_implementation={requested_experts!r} cannot run this model's torchao-quantised "
                                 f"experts (torchao's Int8Tensor has no fused-matmul support); use "
                                 f"experts_implementation={TORCHAO_EXPERTS_IMPLEMENTATION!r} or leave it unset")
            return TORCHAO_EXPERTS_IMPLEMENTATION
        return super().get_correct_experts_implementation(requested_experts or DEFAULT_EXPERTS_IMPLEMENTATION)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Also initialise the router buffers that ``from_pretrained`` did not load (a sigmoid router's bias and counts).

        Loading materialises non-persistent buffers (``tokens_per_expert``) with ``empty_like`` and leaves their
        initialisation to ``_init_weights``; the routers sit inside the dense subtree, whose family
        ``_init_weights`` does not know them. ``init.zeros_`` skips tensors that were loaded.
        """
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, Router):
                module.reset_buffers()

    def _install_experts(self) -> None:
        """Swap the MoE blocks into the dense ``self.model`` and finish initialisation (end of every ``__init__``)."""
        self._moe_blocks = install_moe_blocks(self.model, self.config)
        self.routing_stats: RoutingStats | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def track_routing(self, enabled: bool = True) -> RoutingStats | None:
        """Accumulate routing statistics over training forward passes in ``self.routing_stats`` (or stop)."""
        config = self.config
        self.routing_stats = (
            RoutingStats(len(config.moe_layers), config.num_experts, config.num_experts_per_tok) if enabled else None
        )
        return self.routing_stats

    def update_router_biases(self) -> None:
        """One auxiliary-loss-free balancing step for sigmoid routers (see :meth:`~.routers.SigmoidRouter.update_bias`).

        Call after every optimizer step (``RouterBiasCallback`` does). Routers are found in the module tree, so
        copies made by wrappers (PEFT ``modules_to_save``) are updated too; token counts are summed over all
        processes first, so every replica applies the same update.
        """
        rate = self.config.router_bias_update_rate
        if not ROUTERS[self.config.router_type].balancing_bias or rate <= 0:
            return
        routers = [m for m in self.modules() if isinstance(m, Router)]
        counts = torch.stack([router.tokens_per_expert for router in routers])  # [routers, E]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        for router, load in zip(routers, counts, strict=True):
            router.tokens_per_expert.copy_(load)
            router.update_bias(rate)

    def _wants_router_losses(self, labels: torch.Tensor | None) -> bool:
        return labels is not None and (self.config.router_aux_loss_coef > 0 or self.config.router_z_loss_coef > 0)

    def _add_router_losses(self, loss: torch.Tensor | None, router_logits: list[torch.Tensor],
                           attention_mask: torch.Tensor | None, tracking: bool,
                           weight: float | torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(loss + weight * (aux_coef * aux + z_coef * z), aux) from the recorded router logits, the loss unchanged
        when ``weight`` is None; also feeds the routing statistics. Both router losses are averaged over MoE layers."""
        if not router_logits:
            return loss, None
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if tracking:
            self.routing_stats.update(router_logits, mask)
        k = self.config.num_experts_per_tok
        aux_loss = torch.stack([load_balancing_loss(r, k, mask) for r in router_logits]).mean()
        if loss is not None and weight is not None:
            z_loss = torch.stack([router_z_loss(r, mask) for r in router_logits]).mean()
            extra = self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
            loss = loss + extra.to(loss.device, loss.dtype) * weight
        return loss, aux_loss

    def moe_blocks(self) -> list[UpcycledSparseMoeBlock]:
        """The MoE blocks in layer order (one per entry of ``config.moe_layers``)."""
        return list(self._moe_blocks)

    @contextmanager
    def _record_router_logits(self, enabled: bool) -> Iterator[list[torch.Tensor]]:
        records: list[torch.Tensor] = []
        handles = []
        if enabled:
            for block in self.moe_blocks():
                handles.append(block.gate.register_forward_hook(lambda _m, _i, out: records.append(out[0])))
        try:
            yield records
        finally:
            for handle in handles:
                handle.remove()


class UpcycledMoeForCausalLM(UpcycledMoePreTrainedModel, GenerationMixin):
    """A dense causal LM (``self.model``, built from ``config.text_config``) with MoE blocks in ``config.moe_layers``.

    ``forward`` returns the dense model's LM loss plus ``router_aux_loss_coef * load_balancing_loss``
    and ``router_z_loss_coef * z_loss`` (averaged over MoE layers) when labels are given.
    """

    dense_mapping: ClassVar = MODEL_FOR_CAUSAL_LM_MAPPING

    def __init__(self, config: UpcycledMoeConfig):
        super().__init__(config)
        self.model = _dense_model(self.dense_mapping, config)
        self._install_experts()

    # -- delegation to the dense model ---------------------------------------------------------------
    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """Run the dense model with MoE blocks; ``router_logits`` is a tuple of [B*S, E] float32 tensors."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        want_aux = self._wants_router_losses(labels)
        tracking = self.routing_stats is not None and self.training
        with self._record_router_logits(output_router_logits or want_aux or tracking) as router_logits:
            if past_key_values is not None:  # Transformers >= 5.24 names it ``cache`` (passed in kwargs)
                kwargs["past_key_values"] = past_key_values
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        weight = self._aux_weight(labels, kwargs) if want_aux else None
        loss, aux_loss = self._add_router_losses(outputs.loss, router_logits, attention_mask, tracking, weight)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=outputs.logits,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=tuple(router_logits) if output_router_logits else None,
        )

    @staticmethod
    def _aux_weight(labels: torch.Tensor, kwargs: dict) -> float | torch.Tensor:
        """Share of this micro-batch in the accumulated batch.

        Under gradient accumulation the Trainer passes ``num_items_in_batch`` (label tokens of the whole
        accumulated batch) and sums the micro-batch losses without dividing them: the LM loss is already a
        sum over that count, so the per-micro-batch mean auxiliary losses are weighted by their token share
        to make the total their token-weighted mean instead of ``accumulation_steps`` times it.
        """
        num_items = kwargs.get("num_items_in_batch")
        if num_items is None:
            return 1.0
        local = (labels[..., 1:] != -100).sum()
        return local.to(torch.float32) / torch.as_tensor(num_items, dtype=torch.float32, device=local.device).clamp_min(1)


class UpcycledMoeForImageTextToText(UpcycledMoeForCausalLM):
    """A dense vision-language model (``self.model``, e.g. ``LlavaForConditionalGeneration``, built from
    ``config.text_config``) whose language model has MoE blocks in ``config.moe_layers``; the vision tower and the
    projector are the dense model's own.

    ``forward`` passes image inputs (``pixel_values``, ``image_sizes``, ...) to the dense model and adds the router
    losses; generation prepares its inputs as the dense model does (images on the first step only).
    """

    dense_mapping: ClassVar = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    # Generation steps that vision-language models specialise (multimodal rope positions, masks) run on the dense model.
    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.model.prepare_inputs_for_generation(*args, **kwargs)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        return self.model._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)

    def _validate_model_kwargs(self, model_kwargs: dict) -> None:
        """Image inputs are the dense model's arguments: it checks what our ``forward`` does not name."""
        ours = set(inspect.signature(self.forward).parameters)
        self.model._validate_model_kwargs({key: value for key, value in model_kwargs.items() if key not in ours})


class UpcycledMoeModel(UpcycledMoePreTrainedModel):
    """An upcycled encoder (``AutoModel``): the dense base model (``self.model``, e.g. ``BertModel``) with MoE blocks.

    Returns the dense model's outputs unchanged (``last_hidden_state``, ``pooler_output``, ...). Layer paths in
    the config are relative to the base model.
    """

    def __init__(self, config: UpcycledMoeConfig):
        super().__init__(config)
        self.model = _dense_model(MODEL_MAPPING, config)
        self._install_experts()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        tracking = self.routing_stats is not None and self.training
        with self._record_router_logits(tracking) as router_logits:
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        self._add_router_losses(None, router_logits, attention_mask, tracking, None)
        return outputs


class _UpcycledMoeEncoderWithHead(UpcycledMoePreTrainedModel):
    """An upcycled encoder with the dense family's own task head (``head_mapping``, e.g. ``BertForMaskedLM``).

    The dense head model is built once; its base model is registered here as ``self.model`` (so checkpoints of
    :class:`UpcycledMoeModel` load into every head) and its other children (``cls``, ``classifier``, ...) under
    their own names; ``forward`` runs the dense head model's ``forward`` over these same modules and adds the
    router losses to its loss.
    """

    head_mapping: ClassVar = None
    accepts_loss_kwargs = False  # the dense heads average their loss per batch: let the Trainer scale it

    def __init__(self, config: UpcycledMoeConfig):
        super().__init__(config)
        # task settings given to from_pretrained (num_labels, id2label, problem_type) land on the outer config
        config.text_config.id2label, config.text_config.label2id = config.id2label, config.label2id
        config.text_config.problem_type = config.problem_type
        head = _dense_model(self.head_mapping, config)
        base = head.base_model_prefix
        self.model = getattr(head, base)
        for name, child in head.named_children():
            if name != base:
                self.add_module(name, child)
        object.__setattr__(self, "_dense_head", head)  # not a submodule: its modules are registered above
        tied = getattr(head, "_tied_weights_keys", None) or {}
        self._tied_weights_keys = {_rebase(t, base): _rebase(s, base) for t, s in tied.items()}
        self._install_experts()

    def get_output_embeddings(self) -> nn.Module | None:
        return self._dense_head.get_output_embeddings()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Head weights missing from the checkpoint (a fresh classifier, an MLM head's bias) are initialised
        as the dense family initialises them; routers and experts keep their constructor initialisation."""
        if not isinstance(module, (Router, _ExpertsBase, UpcycledLoraExperts, UpcycledQuantizedExperts)):
            self._dense_head._init_weights(module)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs):
        tracking = self.routing_stats is not None and self.training
        want_aux = self._wants_router_losses(labels)
        with self._record_router_logits(want_aux or tracking) as router_logits:
            outputs = self._dense_head(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        outputs.loss, _ = self._add_router_losses(outputs.loss, router_logits, attention_mask, tracking,
                                                  1.0 if want_aux else None)
        return outputs


def _rebase(name: str, base: str) -> str:
    """``bert.embeddings...`` -> ``model.embeddings...``: the base model lives at ``self.model`` here."""
    return DENSE_PREFIX + name[len(base) + 1:] if name.startswith(base + ".") else name


class UpcycledMoeForMaskedLM(_UpcycledMoeEncoderWithHead):
    """Upcycled encoder with the dense family's masked-LM head (``AutoModelForMaskedLM``)."""

    head_mapping = MODEL_FOR_MASKED_LM_MAPPING


class UpcycledMoeForSequenceClassification(_UpcycledMoeEncoderWithHead):
    """Upcycled encoder with the dense family's sequence-classification head (``AutoModelForSequenceClassification``)."""

    head_mapping = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING


__all__ = [
    "UpcycledMoeModel",
    "UpcycledMoeForMaskedLM",
    "UpcycledMoeForSequenceClassification",
    "install_moe_blocks",
    "UpcycledMoeForCausalLM",
    "UpcycledMoeForImageTextToText",
    "UpcycledMoePreTrainedModel",
    "UpcycledSparseMoeBlock",
    "UpcycledSharedExpert",
    "UpcycledGluExperts",
    "UpcycledGluBiasExperts",
    "UpcycledMlpExperts",
    "UpcycledMlpNoBiasExperts",
    "UpcycledQuantizedExperts",
    "build_experts",
]
