"""Falcon (Almazrouei et al. 2023, "The Falcon Series of Open Language Models"): ``dense_4h_to_h(act(dense_h_to_4h(x)))``.

Layers live under ``transformer.h``. ``FalconMLP`` holds two ``FalconLinear`` layers (``nn.Linear`` subclasses,
weights [out, in]) with biases when ``config.bias``, and its activation in ``act``. It keeps
``config.hidden_dropout`` as a float but does not use it: ``FalconDecoderLayer`` applies
``dropout_add(mlp_output, residual, hidden_dropout, training)`` outside the MLP, so that dropout acts on the MoE
block's output exactly as on the dense MLP's. The MLP's placement (sequential, ``parallel_attn``, or
``new_decoder_architecture`` with one or two layer norms) and the position scheme (rotary or ALiBi) are the
dense model's own code and are unaffected.
"""

from __future__ import annotations

from .base import ArchitectureAdapter, plain_mlp
from .registry import register_adapter

register_adapter(
    ArchitectureAdapter(
        model_types=("falcon",),
        decoder_layers_path="transformer.h",
        **plain_mlp("dense_h_to_4h", "dense_4h_to_h"),
        mlp_activation_attr="act",
        has_bias=lambda config: bool(getattr(config, "bias", False)),
    )
)
