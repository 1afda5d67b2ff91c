"""GPT-NeoX / Pythia (Black et al. 2022): non-gated ``dense_4h_to_h(act(dense_h_to_4h(x)))`` with biases."""

from __future__ import annotations

from .base import ArchitectureAdapter, plain_mlp
from .registry import register_adapter

register_adapter(
    ArchitectureAdapter(
        model_types=("gpt_neox",),
        decoder_layers_path="gpt_neox.layers",
        **plain_mlp("dense_h_to_4h", "dense_4h_to_h"),
        mlp_activation_attr="act",
        has_bias=lambda config: True,
    )
)
