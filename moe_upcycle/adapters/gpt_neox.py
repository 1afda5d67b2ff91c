"""GPT-NeoX / Pythia (Black et al. 2022): non-gated ``dense_4h_to_h(act(dense_h_to_4h(x)))`` with biases."""

from __future__ import annotations

from .base import ArchitectureAdapter, ExpertTensor
from .registry import register_adapter

register_adapter(
    ArchitectureAdapter(
        model_types=("gpt_neox",),
        decoder_layers_path="gpt_neox.layers",
        expert_kind="mlp",
        tensors=(
            ExpertTensor("up_proj", ("dense_h_to_4h.weight",)),
            ExpertTensor("down_proj", ("dense_4h_to_h.weight",)),
        ),
        bias_tensors=(
            ExpertTensor("up_proj_bias", ("dense_h_to_4h.bias",)),
            ExpertTensor("down_proj_bias", ("dense_4h_to_h.bias",)),
        ),
        mlp_activation_attr="act",
        has_bias=lambda config: True,
    )
)
