"""Vision-language models: only the language model's MLPs become MoE blocks (MoE-LLaVA, Lin et al. 2024,
arXiv 2401.15947).

A VLM (``*ForConditionalGeneration``, loaded with ``AutoModelForImageTextToText``) holds a vision tower, a projector
and a language model built from ``config.text_config``. Its language model is a dense text family's base model
(LLaVA's ``model.language_model`` is a ``LlamaModel``), so its MLP layout is that family's adapter with the decoder
layers found under the VLM's language-model path; the vision tower (whose own MLPs are never touched), the projector,
the embeddings and the LM head are copied unchanged. Everything around the MLPs stays the dense model's own code:
multimodal rope positions (Qwen-VL), deepstack features added to early layers' outputs (Qwen3-VL), image masks.
Supported families, in memory (Transformers 5):

- LLaVA / LLaVA-NeXT: ``model.language_model.layers.N.mlp`` (on disk ``language_model.model.layers.N.mlp``: the
  dense model's own key renamings read both), ``model.vision_tower``, ``model.multi_modal_projector``, ``lm_head``;
  a Llama, Mistral, Qwen2 or Qwen3 language model.
- Gemma 3 (multimodal): ``model.language_model.layers.N.mlp`` (a ``Gemma3TextModel``), ``model.vision_tower``
  (SigLIP), ``model.multi_modal_projector``; ``lm_head`` tied to the embeddings.
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL: ``model.language_model.layers.N.mlp`` (text types ``qwen2_vl_text``,
  ``qwen2_5_vl_text``, ``qwen3_vl_text``, which exist only inside these VLMs), ``model.visual`` (the vision tower
  with its patch merger), ``lm_head``.
- Idefics3 / SmolVLM: ``model.text_model.layers.N.mlp`` (Llama), ``model.vision_model``, ``model.connector``,
  ``lm_head``.
- Mistral 3: ``model.language_model.layers.N.mlp`` (Mistral or Llama), ``model.vision_tower`` (Pixtral),
  ``model.multi_modal_projector``, ``lm_head``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import PreTrainedConfig

from .base import ArchitectureAdapter
from .gated import GATED_TENSORS
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


def _gated_text(model_type: str) -> dict[str, ArchitectureAdapter]:
    """``text_adapters`` for a language model of ``model_type`` whose layers (``layers.N``, like a gated family's base
    model) hold gated MLPs without biases."""
    adapter = ArchitectureAdapter(model_types=(model_type,), decoder_layers_path="model.layers", expert_kind="glu",
                                  tensors=GATED_TENSORS)
    return {model_type: adapter}


# Gated text families whose decoder layers sit at ``model.layers`` of their causal LM (``layers`` of the base model).
GATED_LANGUAGE_MODELS = ("llama", "mistral", "qwen2", "qwen3")

register_vision_language(VisionLanguageLayout(("llava", "llava_next"), "model.language_model", GATED_LANGUAGE_MODELS))
register_vision_language(VisionLanguageLayout(("gemma3",), "model.language_model", ("gemma3_text",)))
register_vision_language(VisionLanguageLayout(("qwen2_vl",), "model.language_model", text_adapters=_gated_text("qwen2_vl_text")))
register_vision_language(VisionLanguageLayout(("qwen2_5_vl",), "model.language_model",
                                              text_adapters=_gated_text("qwen2_5_vl_text")))
register_vision_language(VisionLanguageLayout(("qwen3_vl",), "model.language_model", text_adapters=_gated_text("qwen3_vl_text")))
register_vision_language(VisionLanguageLayout(("idefics3", "smolvlm"), "model.text_model", ("llama",)))
register_vision_language(VisionLanguageLayout(("mistral3",), "model.language_model", ("mistral", "llama")))
