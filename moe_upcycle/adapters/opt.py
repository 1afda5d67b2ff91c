"""OPT (Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models"): ``fc2(act(fc1(x)))``.

OPT has no MLP module: ``fc1``, ``activation_fn`` and ``fc2`` sit directly on the decoder layer, whose forward
calls them in turn (after ``final_layer_norm`` when ``do_layer_norm_before``, then dropout and the residual).
The MoE block takes ``fc1``'s place and computes the whole feed-forward; ``activation_fn`` and ``fc2`` become
identities, so the layer's own dropout, residual and norms act on the block's output as on the dense one's.
"""

from __future__ import annotations

from .base import ArchitectureAdapter, plain_mlp
from .registry import register_adapter

register_adapter(
    ArchitectureAdapter(
        model_types=("opt",),
        decoder_layers_path="model.decoder.layers",
        **plain_mlp("fc1", "fc2"),
        mlp_module_name="fc1",
        mlp_activation_attr="activation_fn",
        sources_in_layer=True,
        bypass=("activation_fn", "fc2"),
        has_bias=lambda config: bool(getattr(config, "enable_bias", True)),
    )
)
