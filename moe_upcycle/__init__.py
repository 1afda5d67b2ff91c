"""moe-upcycle: turn a pretrained dense Transformers model into a sparse Mixture-of-Experts model.

``import moe_upcycle`` registers ``UpcycledMoeConfig`` / ``UpcycledMoeForCausalLM`` with ``AutoConfig`` and
``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .modeling.configuration_upcycled_moe import UpcycledMoeConfig
from .modeling.modeling_upcycled_moe import UpcycledMoeForCausalLM, UpcycledSparseMoeBlock

__version__ = "0.1.0"

AutoConfig.register(UpcycledMoeConfig.model_type, UpcycledMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(UpcycledMoeConfig, UpcycledMoeForCausalLM, exist_ok=True)
# ``save_pretrained`` then writes ``auto_map`` and copies the runtime folder's files next to the weights.
UpcycledMoeConfig.register_for_auto_class()
UpcycledMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def __getattr__(name: str):
    # Lazy: the converter pulls in huggingface_hub / safetensors machinery that plain model use does not need.
    if name in ("upcycle", "UpcycleOptions"):
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'moe_upcycle' has no attribute {name!r}")


__all__ = ["UpcycledMoeConfig", "UpcycledMoeForCausalLM", "UpcycledSparseMoeBlock", "upcycle", "UpcycleOptions", "__version__"]
