"""Phi-3 (Abdin et al. 2024): one fused ``gate_up_proj`` [2I, H], gate rows first, as our experts store it."""

from __future__ import annotations

from .base import ArchitectureAdapter, ExpertTensor
from .registry import register_adapter

register_adapter(
    ArchitectureAdapter(
        model_types=("phi3",),
        decoder_layers_path="model.layers",
        expert_kind="glu",
        tensors=(
            ExpertTensor("gate_up_proj", ("gate_up_proj.weight",)),
            ExpertTensor("down_proj", ("down_proj.weight",)),
        ),
        mlp_activation_attr="activation_fn",
    )
)
