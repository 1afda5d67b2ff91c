"""Build the native config (``MixtralConfig``, ``Qwen2MoeConfig``, ...) from an upcycled checkpoint's config.

The dense ``text_config`` supplies everything outside the experts (rope, norms, attention, embeddings,
multipliers, sliding window, tied embeddings, special tokens); the target's ``moe_fields`` supply the rest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from ..modeling.configuration_upcycled_moe import UpcycledMoeConfig
from .errors import ExportError
from .targets import NativeTarget

# Bookkeeping keys of a serialised config that describe the file, not the model.
_BOOKKEEPING = frozenset({"model_type", "architectures", "auto_map", "_name_or_path", "transformers_version",
                          "_commit_hash", "_attn_implementation_autoset", "base_config_key", "sub_configs"})


def declared_fields(config_class: type[PreTrainedConfig]) -> set[str]:
    """The fields a Transformers 5 config dataclass declares (its own and its bases')."""
    return {f.name for f in dataclasses.fields(config_class)}


def _dense_values(text: PreTrainedConfig, target: NativeTarget, native_fields: set[str]) -> dict[str, Any]:
    """The dense config's values that carry over: fields the native class declares, ``carry`` fields and
    undeclared extra attributes (read with ``getattr`` by modeling code). Refuses an unknown dense-only field."""
    dense_fields = declared_fields(type(text))
    values: dict[str, Any] = {}
    for name, value in text.to_dict().items():
        if name in _BOOKKEEPING:
            continue
        if name in native_fields or name not in dense_fields:
            values[name] = value
            continue
        rule = target.dense_only_fields.get(name)
        if rule is None:
            raise ExportError(f"the source {text.model_type} config field {name}={value!r} has no counterpart in "
                              f"{target.label} ({target.architecture}); cannot export it exactly")
        if rule == "carry":
            values[name] = value
        # "ignore", and Require rules (values already checked by explain_mismatch), are not carried.
    return values


def build_native_config(config: UpcycledMoeConfig, target: NativeTarget) -> PreTrainedConfig:
    """The native config of ``target`` computing what ``config`` does; raises :class:`ExportError` if it cannot.

    A vision-language source keeps its own config class (e.g. ``LlavaConfig``) and every field of it; only its
    ``text_config`` becomes the native MoE config (``MixtralConfig``), which stock Transformers builds the language
    model from; a ``vision_language`` target rebuilds it as the target's VLM config (Qwen3-VL -> Qwen3-VL-MoE)."""
    native_class = CONFIG_MAPPING[target.name]
    if target.vision_language:
        native_class = native_class.sub_configs["text_config"]
    native_fields = declared_fields(native_class)
    text, vision_language = config.get_text_config(), config.get_text_config() is not config.text_config
    values = _dense_values(text, target, native_fields)
    values.update(target.moe_fields(config))
    if not vision_language:
        values["architectures"] = [target.architecture]
        values["tie_word_embeddings"] = bool(config.tie_word_embeddings)
    if config.dtype is not None:
        values["dtype"] = config.dtype
    try:
        native = native_class(**values)
    except (TypeError, ValueError) as err:
        raise ExportError(f"cannot build a {target.label} config from this checkpoint: {err}") from None
    _check_kept(native, values, target)
    return _vision_language_config(config, native, target) if vision_language else native


def _vision_language_config(config: UpcycledMoeConfig, native_text: PreTrainedConfig, target: NativeTarget) -> PreTrainedConfig:
    """The source VLM's config (or, for a ``vision_language`` target, the target's VLM config carrying every field of
    it) with ``native_text`` as its language model, architecture and dtype set."""
    dense = config.text_config
    vlm_class = CONFIG_MAPPING[target.name] if target.vision_language else type(dense)
    values = {name: value for name, value in dense.to_dict().items() if name not in _BOOKKEEPING and name != "text_config"}
    if vlm_class is not type(dense):
        _check_fields(type(dense), vlm_class, values, target)
        for name, sub_class in vlm_class.sub_configs.items():  # the vision config, as the target's class
            if name != "text_config":
                sub = getattr(dense, name)
                sub_values = {key: value for key, value in sub.to_dict().items() if key not in _BOOKKEEPING}
                _check_fields(type(sub), sub_class, sub_values, target)
                values[name] = sub_class(**sub_values)
    values.update(text_config=native_text, architectures=[MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[vlm_class].__name__])
    if config.dtype is not None:
        values["dtype"] = config.dtype
    native = vlm_class(**values)
    for name in ("tie_word_embeddings", "image_token_id", "vision_feature_layer", "vision_feature_select_strategy"):
        if getattr(native, name, None) != getattr(dense, name, None):
            raise ExportError(f"the {dense.model_type} config changed {name} from {getattr(dense, name, None)!r} to "
                              f"{getattr(native, name, None)!r} with a native language model; cannot export it exactly")
    return native


def _check_fields(dense_class: type[PreTrainedConfig], native_class: type[PreTrainedConfig], values: dict[str, Any],
                  target: NativeTarget) -> None:
    """Raise if ``values`` of a ``dense_class`` config hold a declared field that ``native_class`` lacks."""
    missing = sorted(set(values) & (declared_fields(dense_class) - declared_fields(native_class)))
    if missing:
        raise ExportError(f"the source {dense_class.model_type} config fields {missing} have no counterpart in "
                          f"{target.label} ({native_class.__name__}); cannot export it exactly")


def _check_kept(native: PreTrainedConfig, values: dict[str, Any], target: NativeTarget) -> None:
    """Raise if the native config's own set-up changed a value that the model's function depends on."""
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "rms_norm_eps", "rope_parameters", "vocab_size", "num_experts_per_tok", "hidden_act"):
        if name in values and getattr(native, name, None) != values[name]:
            raise ExportError(f"{target.label} config changed {name} from {values[name]!r} to {getattr(native, name, None)!r}; "
                              "cannot export this checkpoint exactly")


__all__ = ["build_native_config", "declared_fields"]
