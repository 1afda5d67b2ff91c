"""The streaming converter: dense safetensors checkpoints in (one to upcycle, several to mix), MoE checkpoint out."""

from .converter import UpcycleResult, upcycle
from .mixer import mix
from .options import UpcycleOptions, resolve_layers

__all__ = ["UpcycleOptions", "UpcycleResult", "mix", "resolve_layers", "upcycle"]
