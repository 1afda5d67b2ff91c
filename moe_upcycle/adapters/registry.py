"""The explicit registry of architecture adapters, keyed by ``config.model_type``.

Text families register an :class:`ArchitectureAdapter`; vision-language families register a layout (see
``vision_language.py``) that builds the adapter of one checkpoint from its language model's family.
"""

from __future__ import annotations

from typing import Protocol

from transformers import PreTrainedConfig

from ..errors import UnsupportedArchitectureError
from .base import ArchitectureAdapter

_ADAPTERS: dict[str, ArchitectureAdapter] = {}


class _VisionLanguage(Protocol):
    model_types: tuple[str, ...]

    def explain(self, config: PreTrainedConfig) -> str | None: ...

    def adapter(self, config: PreTrainedConfig) -> ArchitectureAdapter: ...


_VISION_LANGUAGE: dict[str, _VisionLanguage] = {}


def _claim(model_types: tuple[str, ...]) -> None:
    for model_type in model_types:
        if model_type in _ADAPTERS or model_type in _VISION_LANGUAGE:
            raise ValueError(f"an adapter for model_type {model_type!r} is already registered")


def register_adapter(adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    """Register ``adapter`` for each of its model types; a model type registered twice is an error."""
    _claim(adapter.model_types)
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter


def register_vision_language(layout: _VisionLanguage) -> _VisionLanguage:
    """Register a vision-language layout for each of its model types; a model type registered twice is an error."""
    _claim(layout.model_types)
    for model_type in layout.model_types:
        _VISION_LANGUAGE[model_type] = layout
    return layout


def text_adapter(model_type: str) -> ArchitectureAdapter | None:
    """The adapter registered for the text family ``model_type``, if any."""
    return _ADAPTERS.get(model_type)


def supported_model_types(text_only: bool = False) -> list[str]:
    return sorted(_ADAPTERS) if text_only else sorted([*_ADAPTERS, *_VISION_LANGUAGE])


def supported_vision_language_types() -> list[str]:
    return sorted(_VISION_LANGUAGE)


def explain(config: PreTrainedConfig) -> str | None:
    """Why ``config`` cannot be upcycled, or ``None`` when it can."""
    layout = _VISION_LANGUAGE.get(config.model_type)
    if layout is not None:
        reason = layout.explain(config)
        return None if reason is None else f"vision-language model_type {config.model_type!r} cannot be upcycled: {reason}"
    adapter = _ADAPTERS.get(config.model_type)
    if adapter is None:
        if getattr(config, "vision_config", None) is not None:
            return (f"vision-language model_type {config.model_type!r} is not supported; supported vision-language "
                    f"families: {', '.join(supported_vision_language_types())}")
        return (
            f"model_type {config.model_type!r} is not supported; supported families: "
            f"{', '.join(supported_model_types())}"
        )
    reason = adapter.explain(config)
    return None if reason is None else f"model_type {config.model_type!r} cannot be upcycled: {reason}"


def get_adapter(config: PreTrainedConfig) -> ArchitectureAdapter:
    """The adapter for ``config``; raises :class:`UnsupportedArchitectureError` saying why not."""
    reason = explain(config)
    if reason is not None:
        raise UnsupportedArchitectureError(reason)
    layout = _VISION_LANGUAGE.get(config.model_type)
    return layout.adapter(config) if layout is not None else _ADAPTERS[config.model_type]
