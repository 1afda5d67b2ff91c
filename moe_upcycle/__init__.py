"""moe-upcycle: turn a pretrained dense Transformers model into a sparse Mixture-of-Experts model.

``import moe_upcycle`` registers ``UpcycledMoeConfig`` with ``AutoConfig``, ``UpcycledMoeForCausalLM`` with
``AutoModelForCausalLM`` (upcycled decoders) and the upcycled encoder classes with ``AutoModel``,
``AutoModelForMaskedLM`` and ``AutoModelForSequenceClassification``.
"""

from .modeling import (  # registers the upcycled classes with the Auto classes
    UpcycledMoeConfig,
    UpcycledMoeForCausalLM,
    UpcycledMoeForMaskedLM,
    UpcycledMoeForSequenceClassification,
    UpcycledMoeModel,
    UpcycledSparseMoeBlock,
)
from .version import __version__


def __getattr__(name: str):
    # Lazy: the converter pulls in huggingface_hub / safetensors machinery that plain model use does not need.
    if name in ("upcycle", "mix", "UpcycleOptions"):
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'moe_upcycle' has no attribute {name!r}")


__all__ = ["UpcycledMoeConfig", "UpcycledMoeForCausalLM", "UpcycledMoeModel", "UpcycledMoeForMaskedLM",
           "UpcycledMoeForSequenceClassification", "UpcycledSparseMoeBlock", "mix", "upcycle", "UpcycleOptions", "__version__"]
