"""Phi-1 / Phi-1.5 / Phi-2 (Gunasekar et al. 2023, "Textbooks Are All You Need"): non-gated ``fc2(act(fc1(x)))``.

``PhiMLP`` always carries biases on ``fc1`` and ``fc2`` (plain ``nn.Linear``, weights [out, in]) and keeps its
activation in ``activation_fn``. It applies no dropout itself: ``PhiDecoderLayer`` applies ``resid_dropout``
(an ``nn.Dropout``) to the MLP output, outside the module we replace, so it acts on the MoE block's output
exactly as it did on the dense MLP's, in training as in eval.
"""

from __future__ import annotations

from .base import ArchitectureAdapter, plain_mlp
from .registry import register_adapter

register_adapter(
    ArchitectureAdapter(
        model_types=("phi",),
        decoder_layers_path="model.layers",
        **plain_mlp("fc1", "fc2"),
        mlp_activation_attr="activation_fn",
        has_bias=lambda config: True,
    )
)
