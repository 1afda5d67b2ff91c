"""The streaming converter: dense safetensors checkpoint in, upcycled MoE checkpoint out."""

from .converter import UpcycleResult, upcycle
from .options import UpcycleOptions, resolve_layers

__all__ = ["UpcycleOptions", "UpcycleResult", "resolve_layers", "upcycle"]
