"""BERT encoders (Devlin et al. 2019), e.g. sentence-transformers' all-MiniLM-L6-v2: ``output.dense(act(intermediate.dense(x)))``.

The feed-forward of a ``BertLayer`` spans two modules: ``intermediate`` (``dense`` + activation) and ``output``
(``dense``, dropout, then ``LayerNorm(x + attention_output)``). The MoE block takes ``intermediate``'s place
and computes both projections; ``output.dense`` becomes an identity, so ``output``'s dropout, residual and
LayerNorm act on the block's output as on the dense one's. Upcycled encoders load with ``AutoModel``,
``AutoModelForMaskedLM`` and ``AutoModelForSequenceClassification``.
"""

from __future__ import annotations

from .base import ArchitectureAdapter, plain_mlp
from .registry import register_adapter


def _check(config) -> str | None:
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "BERT used as a decoder (is_decoder / add_cross_attention) is not supported; upcycle the encoder"
    if getattr(config, "chunk_size_feed_forward", 0):
        return "chunk_size_feed_forward > 0 is not supported; set it to 0"
    return None


register_adapter(
    ArchitectureAdapter(
        model_types=("bert",),
        decoder_layers_path="encoder.layer",
        **plain_mlp("intermediate.dense", "output.dense"),
        mlp_module_name="intermediate",
        mlp_activation_attr="intermediate_act_fn",
        task="encoder",
        sources_in_layer=True,
        bypass=("output.dense",),
        has_bias=lambda config: True,
        check=_check,
    )
)
