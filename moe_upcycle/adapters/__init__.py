"""Architecture adapters, one module per MLP layout; importing this package registers them all."""

from . import bert, falcon, gated, gpt2, gpt_neox, opt, phi, phi3, starcoder2, vision_language  # noqa: F401  (registration side effects)
from .base import ArchitectureAdapter, ExpertTensor
from .registry import explain, get_adapter, register_adapter, supported_model_types

__all__ = ["ArchitectureAdapter", "ExpertTensor", "explain", "get_adapter", "register_adapter", "supported_model_types"]
