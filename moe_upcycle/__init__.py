"""moe-upcycle: turn a pretrained dense Transformers model into a sparse Mixture-of-Experts model.

``import moe_upcycle`` registers ``UpcycledMoeConfig`` with ``AutoConfig``, ``UpcycledMoeForCausalLM`` with
``AutoModelForCausalLM`` (upcycled decoders) and the upcycled encoder classes with ``AutoModel``,
``AutoModelForMaskedLM`` and ``AutoModelForSequenceClassification``.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from .modeling.configuration_upcycled_moe import UpcycledMoeConfig
from .modeling.modeling_upcycled_moe import (
    UpcycledMoeForCausalLM,
    UpcycledMoeForMaskedLM,
    UpcycledMoeForSequenceClassification,
    UpcycledMoeModel,
    UpcycledSparseMoeBlock,
)

__version__ = "0.1.0"

AutoConfig.register(UpcycledMoeConfig.model_type, UpcycledMoeConfig, exist_ok=True)
# ``save_pretrained`` then writes ``auto_map`` and copies the runtime folder's files next to the weights.
UpcycledMoeConfig.register_for_auto_class()
for _auto, _model in ((AutoModelForCausalLM, UpcycledMoeForCausalLM), (AutoModel, UpcycledMoeModel),
                      (AutoModelForMaskedLM, UpcycledMoeForMaskedLM),
                      (AutoModelForSequenceClassification, UpcycledMoeForSequenceClassification)):
    _auto.register(UpcycledMoeConfig, _model, exist_ok=True)
    _model.register_for_auto_class(_auto.__name__)


def __getattr__(name: str):
    # Lazy: the converter pulls in huggingface_hub / safetensors machinery that plain model use does not need.
    if name in ("upcycle", "UpcycleOptions"):
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'moe_upcycle' has no attribute {name!r}")


__all__ = ["UpcycledMoeConfig", "UpcycledMoeForCausalLM", "UpcycledMoeModel", "UpcycledMoeForMaskedLM",
           "UpcycledMoeForSequenceClassification", "UpcycledSparseMoeBlock", "upcycle", "UpcycleOptions", "__version__"]
