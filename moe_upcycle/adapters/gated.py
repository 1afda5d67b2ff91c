"""Families whose MLP is ``down_proj(act(gate_proj(x)) * up_proj(x))`` with separate gate and up weights.

Llama (Touvron et al. 2023), Mistral, Qwen2/Qwen3, Gemma 1/2/3, OLMo 2, Granite, StableLM (Stability AI,
"Stable LM 2 1.6B Technical Report", Bellagente et al. 2024): the same tensor names under ``model.layers.{i}.mlp``;
they differ only in what the dense model does around the MLP (StableLM's parallel residual, partial rotary,
per-head q/k norms and the ``hidden_dropout`` it applies to the MLP output), which stays the dense model's own code.
"""

from __future__ import annotations

from .base import ArchitectureAdapter, ExpertTensor
from .registry import register_adapter

GATED_TENSORS = (
    ExpertTensor("gate_up_proj", ("gate_proj.weight", "up_proj.weight")),
    ExpertTensor("down_proj", ("down_proj.weight",)),
)
GATED_BIASES = (
    ExpertTensor("gate_up_proj_bias", ("gate_proj.bias", "up_proj.bias")),
    ExpertTensor("down_proj_bias", ("down_proj.bias",)),
)


def _mlp_bias(config) -> bool:
    return bool(getattr(config, "mlp_bias", False))


# Families with an ``mlp_bias`` option (Llama, Granite) carry biased experts when it is set.
register_adapter(
    ArchitectureAdapter(
        model_types=("llama", "granite"),
        decoder_layers_path="model.layers",
        expert_kind="glu",
        tensors=GATED_TENSORS,
        bias_tensors=GATED_BIASES,
        has_bias=_mlp_bias,
    )
)

register_adapter(
    ArchitectureAdapter(
        model_types=("mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "stablelm"),
        decoder_layers_path="model.layers",
        expert_kind="glu",
        tensors=GATED_TENSORS,
    )
)
