"""Vision-language models (LLaVA, ...): only the language model's MLPs become MoE blocks (MoE-LLaVA, Lin et al. 2024,
arXiv 2401.15947).

A VLM (``*ForConditionalGeneration``, loaded with ``AutoModelForImageTextToText``) holds a vision tower, a projector
and a language model built from ``config.text_config``. Its language model is a dense text family's base model
(LLaVA's ``model.language_model`` is a ``LlamaModel``), so its MLP layout is that family's adapter with the decoder
layers found under the VLM's language-model path; the vision tower (whose own MLPs are never touched), the projector,
the embeddings and the LM head are copied unchanged. In memory (Transformers 5):

- LLaVA / LLaVA-NeXT: ``model.language_model.layers.N.mlp`` (on disk ``language_model.model.layers.N.mlp``: the
  dense model's own key renamings read both), ``model.vision_tower``, ``model.multi_modal_projector``, ``lm_head``.
- Gemma 3 (multimodal): ``model.language_model.layers.N.mlp`` (a ``Gemma3TextModel``), ``model.vision_tower``
  (SigLIP), ``model.multi_modal_projector``; ``lm_head`` tied to the embeddings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import PreTrainedConfig

from .base import ArchitectureAdapter
from .registry import register_vision_language, text_adapter


@dataclass(frozen=True)
class VisionLanguageLayout:
    """Where one VLM family keeps its language model.

    Args:
        model_types: ``config.model_type`` values of the VLM.
        language_model_path: dotted path of the language model (a text family's base model, its decoder layers at
            ``.layers``) inside the ``AutoModelForImageTextToText`` module.
        language_models: text families (registered text adapters) the language model may be; each was tested
            inside this VLM.
        text_adapters: adapters for language models of text types that exist only inside this VLM (Qwen2-VL's
            ``qwen2_vl_text``), keyed by model type.
    """

    model_types: tuple[str, ...]
    language_model_path: str
    language_models: tuple[str, ...] = ()
    text_adapters: dict[str, ArchitectureAdapter] = dataclasses.field(default_factory=dict)

    def _text(self, config: PreTrainedConfig) -> tuple[PreTrainedConfig | None, ArchitectureAdapter | str]:
        """(the language model's config, its adapter or why there is none)."""
        text = getattr(config, "text_config", None)
        if not isinstance(text, PreTrainedConfig):
            return None, "its config has no text_config"
        adapter = self.text_adapters.get(text.model_type)
        if adapter is None and text.model_type in self.language_models:
            adapter = text_adapter(text.model_type)
        if adapter is None:
            supported = sorted([*self.language_models, *self.text_adapters])
            return text, (f"its language model is {text.model_type!r}, which is not supported in {config.model_type} "
                          f"(supported: {', '.join(supported)})")
        return text, adapter

    def explain(self, config: PreTrainedConfig) -> str | None:
        text, adapter = self._text(config)
        if isinstance(adapter, str):
            return adapter
        reason = adapter.check(text)
        return None if reason is None else f"its {text.model_type} language model cannot be upcycled: {reason}"

    def adapter(self, config: PreTrainedConfig) -> ArchitectureAdapter:
        """The text family's adapter moved under the VLM's language model (call after :meth:`explain` said yes)."""
        _, base = self._text(config)
        path = f"{self.language_model_path}.{base.decoder_layers_path.removeprefix('model.')}"
        return dataclasses.replace(
            base, model_types=(config.model_type,), decoder_layers_path=path, task="image_text_to_text",
            has_bias=lambda vlm: base.has_bias(vlm.text_config), check=lambda vlm: base.check(vlm.text_config),
        )


# Gated text families whose decoder layers sit at ``model.layers`` of their causal LM (``layers`` of the base model).
GATED_LANGUAGE_MODELS = ("llama", "mistral", "qwen2", "qwen3")

register_vision_language(VisionLanguageLayout(("llava", "llava_next"), "model.language_model", GATED_LANGUAGE_MODELS))
register_vision_language(VisionLanguageLayout(("gemma3",), "model.language_model", ("gemma3_text",)))
