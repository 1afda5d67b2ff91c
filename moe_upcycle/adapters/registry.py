"""The explicit registry of architecture adapters, keyed by ``config.model_type``."""

from __future__ import annotations

from transformers import PreTrainedConfig

from ..errors import UnsupportedArchitectureError
from .base import ArchitectureAdapter

_ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    """Register ``adapter`` for each of its model types; a model type registered twice is an error."""
    for model_type in adapter.model_types:
        if model_type in _ADAPTERS:
            raise ValueError(f"an adapter for model_type {model_type!r} is already registered")
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def explain(config: PreTrainedConfig) -> str | None:
    """Why ``config`` cannot be upcycled, or ``None`` when it can."""
    adapter = _ADAPTERS.get(config.model_type)
    if adapter is None:
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
    return _ADAPTERS[config.model_type]
