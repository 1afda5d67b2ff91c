"""StarCoder2 (Lozhkov et al. 2024, "StarCoder 2 and The Stack v2"): non-gated ``c_proj(act(c_fc(x)))``.

``Starcoder2MLP`` holds plain ``nn.Linear`` layers (weights [out, in]) with biases when ``config.use_bias``
(true for the released checkpoints) and its activation in ``act``.

Dropout: the dense MLP ends with ``nn.functional.dropout(h, p=config.residual_dropout, training=self.training)``,
a functional call on a float, not an ``nn.Module``, so there is nothing for ``mlp_dropout_attr`` to point at
and the MoE block applies no dropout on its output. In eval (and whenever ``residual_dropout == 0``, the
config default) that dropout is the identity, so the upcycled model computes exactly what the dense one did.
Only when training with ``residual_dropout > 0`` does it differ: the MLP-output dropout is not applied in the
MoE layers (attention-output and embedding dropout, applied outside the MLP, are unchanged). That is a
regularisation difference during fine-tuning, not a difference in the function being upcycled.
"""

from __future__ import annotations

from .base import ArchitectureAdapter, plain_mlp
from .registry import register_adapter

register_adapter(
    ArchitectureAdapter(
        model_types=("starcoder2",),
        decoder_layers_path="model.layers",
        **plain_mlp("c_fc", "c_proj"),
        mlp_activation_attr="act",
        has_bias=lambda config: bool(getattr(config, "use_bias", True)),
    )
)
