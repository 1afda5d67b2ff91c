"""GPT-2 (Radford et al. 2019): non-gated MLP of ``Conv1D`` layers, weights stored [in, out], with biases."""

from __future__ import annotations

from .base import ArchitectureAdapter, plain_mlp
from .registry import register_adapter


def _check(config) -> str | None:
    if getattr(config, "add_cross_attention", False):
        return "add_cross_attention=True (encoder-decoder use) is not supported"
    return None


register_adapter(
    ArchitectureAdapter(
        model_types=("gpt2",),
        decoder_layers_path="transformer.h",
        **plain_mlp("c_fc", "c_proj", transpose=True),
        mlp_activation_attr="act",
        mlp_dropout_attr="dropout",
        has_bias=lambda config: True,
        check=_check,
    )
)
