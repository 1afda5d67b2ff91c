"""The upcycled MoE runtime: config, model classes and expert kernels. Importing it registers the classes with
the Auto classes; the files of this folder are also what ``trust_remote_code`` checkpoints carry."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from .configuration_upcycled_moe import UpcycledMoeConfig
from .modeling_upcycled_moe import (
    UpcycledMoeForCausalLM,
    UpcycledMoeForImageTextToText,
    UpcycledMoeForMaskedLM,
    UpcycledMoeForSequenceClassification,
    UpcycledMoeModel,
    UpcycledSparseMoeBlock,
)

AutoConfig.register(UpcycledMoeConfig.model_type, UpcycledMoeConfig, exist_ok=True)
# ``save_pretrained`` then writes ``auto_map`` and copies the runtime folder's files next to the weights.
UpcycledMoeConfig.register_for_auto_class()
for _auto, _model in ((AutoModelForCausalLM, UpcycledMoeForCausalLM), (AutoModel, UpcycledMoeModel),
                      (AutoModelForMaskedLM, UpcycledMoeForMaskedLM),
                      (AutoModelForSequenceClassification, UpcycledMoeForSequenceClassification),
                      (AutoModelForImageTextToText, UpcycledMoeForImageTextToText)):
    _auto.register(UpcycledMoeConfig, _model, exist_ok=True)
    _model.register_for_auto_class(_auto.__name__)

__all__ = ["UpcycledMoeConfig", "UpcycledMoeForCausalLM", "UpcycledMoeForImageTextToText", "UpcycledMoeForMaskedLM",
           "UpcycledMoeForSequenceClassification", "UpcycledMoeModel", "UpcycledSparseMoeBlock"]
