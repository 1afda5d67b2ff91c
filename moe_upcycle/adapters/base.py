"""Architecture adapters: where a dense family keeps its decoder layers and MLP weights, as data.

An adapter answers "can I convert this config, and if not, why" before any work starts, and names every
dense MLP tensor that becomes part of an expert tensor (weight names are API).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedConfig

from ..modeling.configuration_upcycled_moe import ExpertKind

Task = Literal["causal_lm", "encoder", "image_text_to_text"]


@dataclass(frozen=True)
class ExpertTensor:
    """One fused expert tensor and the dense MLP tensors it is built from.

    Args:
        name: expert tensor name under ``mlp.experts`` (``gate_up_proj``, ``down_proj_bias``, ...).
        sources: dense tensor names relative to the MLP module, concatenated along dim 0 in this order.
        transpose: the dense weights are stored [in, out] (GPT-2 ``Conv1D``) and must be transposed.
    """

    name: str
    sources: tuple[str, ...]
    transpose: bool = False

    @property
    def is_bias(self) -> bool:
        return self.name.endswith("_bias")


@dataclass(frozen=True)
class ArchitectureAdapter:
    """How one dense family maps onto ``UpcycledMoeForCausalLM``.

    Args:
        model_types: ``config.model_type`` values this adapter handles.
        decoder_layers_path: dotted path of the decoder layer list inside the ``*ForCausalLM`` module.
        expert_kind: ``"glu"`` for gated MLPs, ``"mlp"`` for ``down(act(up(x)))``.
        tensors: the expert tensors, without biases.
        bias_tensors: the expert bias tensors, used when :meth:`has_bias` is true.
        mlp_module_name: attribute of a decoder layer holding the MLP.
        mlp_activation_attr: attribute of the dense MLP (or else of the layer) holding its activation module.
        mlp_dropout_attr: attribute of the dense MLP holding a dropout on its output, if any.
        task: ``"causal_lm"`` (decoders, ``AutoModelForCausalLM``; layer paths are relative to it) or
            ``"encoder"`` (``AutoModel`` and its heads; layer paths are relative to the base model) or
            ``"image_text_to_text"`` (vision-language models, ``AutoModelForImageTextToText``; see vision_language.py).
        sources_in_layer: expert ``sources`` are relative to the decoder layer instead of the MLP module, for
            families whose feed-forward is not one module (OPT's ``fc1``/``fc2``, BERT's ``intermediate``/``output``).
        bypass: modules of a layer (dotted, relative to it) replaced by ``nn.Identity`` because the MoE block,
            placed at ``mlp_module_name``, already computes them (OPT's activation and ``fc2``, BERT's ``output.dense``).
        has_bias: config -> whether this checkpoint's MLP projections carry biases.
        check: config -> reason the config cannot be converted, or ``None``.
    """

    model_types: tuple[str, ...]
    decoder_layers_path: str
    expert_kind: ExpertKind
    tensors: tuple[ExpertTensor, ...]
    bias_tensors: tuple[ExpertTensor, ...] = ()
    mlp_module_name: str = "mlp"
    mlp_activation_attr: str = "act_fn"
    mlp_dropout_attr: str | None = None
    task: Task = "causal_lm"
    sources_in_layer: bool = False
    bypass: tuple[str, ...] = ()
    has_bias: Callable[[PreTrainedConfig], bool] = field(default=lambda config: False)
    check: Callable[[PreTrainedConfig], str | None] = field(default=lambda config: None)

    def expert_tensors(self, config: PreTrainedConfig) -> tuple[ExpertTensor, ...]:
        """Every expert tensor written for one MoE layer of this checkpoint."""
        return self.tensors + (self.bias_tensors if self.has_bias(config) else ())

    def mlp_prefix(self, layer: int) -> str:
        """Dense-model tensor prefix of layer ``layer``'s MLP, e.g. ``model.layers.3.mlp.``."""
        return f"{self.decoder_layers_path}.{layer}.{self.mlp_module_name}."

    def source_prefix(self, layer: int) -> str:
        """Prefix of the dense tensors named by ``ExpertTensor.sources`` in layer ``layer``."""
        if self.sources_in_layer:
            return f"{self.decoder_layers_path}.{layer}."
        return self.mlp_prefix(layer)

    def explain(self, config: PreTrainedConfig) -> str | None:
        """Why ``config`` cannot be converted by this adapter, or ``None`` when it can."""
        if config.model_type not in self.model_types:
            return f"model_type {config.model_type!r} is not one of {self.model_types}"
        return self.check(config)

    def moe_config_fields(self, config: PreTrainedConfig) -> dict:
        """The ``UpcycledMoeConfig`` fields that describe this family's layout."""
        return {
            "expert_kind": self.expert_kind,
            "expert_bias": self.has_bias(config),
            "decoder_layers_path": self.decoder_layers_path,
            "mlp_module_name": self.mlp_module_name,
            "mlp_activation_attr": self.mlp_activation_attr,
            "mlp_dropout_attr": self.mlp_dropout_attr,
            "mlp_bypass": list(self.bypass),
        }


def plain_mlp(up: str, down: str, *, transpose: bool = False) -> dict:
    """``expert_kind``, ``tensors`` and ``bias_tensors`` of a non-gated MLP ``down(act(up(x)))``.

    ``up`` / ``down`` name the two linear layers relative to the MLP module (or to the layer, with
    ``sources_in_layer``); ``transpose`` for weights stored [in, out] (GPT-2 ``Conv1D``).
    """
    return {
        "expert_kind": "mlp",
        "tensors": (ExpertTensor("up_proj", (f"{up}.weight",), transpose),
                    ExpertTensor("down_proj", (f"{down}.weight",), transpose)),
        "bias_tensors": (ExpertTensor("up_proj_bias", (f"{up}.bias",)), ExpertTensor("down_proj_bias", (f"{down}.bias",))),
    }
