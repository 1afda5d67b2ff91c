"""GPT-2 (Radford et al. 2019): non-gated MLP of ``Conv1D`` layers, weights stored [in, out], with biases."""

from __future__ import annotations

from .base import ArchitectureAdapter, ExpertTensor
from .registry import register_adapter


def _check(config) -> str | None:
    if getattr(config, "add_cross_attention", False):
        return "add_cross_attention=True (encoder-decoder use) is not supported"
    return None


register_adapter(
    ArchitectureAdapter(
        model_types=("gpt2",),
        decoder_layers_path="transformer.h",
        expert_kind="mlp",
        tensors=(
            ExpertTensor("up_proj", ("c_fc.weight",), transpose=True),
            ExpertTensor("down_proj", ("c_proj.weight",), transpose=True),
        ),
        bias_tensors=(
            ExpertTensor("up_proj_bias", ("c_fc.bias",)),
            ExpertTensor("down_proj_bias", ("c_proj.bias",)),
        ),
        mlp_activation_attr="act",
        mlp_dropout_attr="dropout",
        has_bias=lambda config: True,
        check=_check,
    )
)
