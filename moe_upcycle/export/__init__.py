"""Export an upcycled checkpoint to its native Transformers MoE twin (Mixtral, Qwen2-MoE, Qwen3-MoE, FlexOlmo,
GraniteMoE; a vision-language model keeps its class with such a language model, Qwen3-VL becomes Qwen3-VL-MoE), so that
stock ``AutoModelForCausalLM`` (``AutoModelForImageTextToText``) ``.from_pretrained`` loads it without this package.

``export_native(folder, output, to="auto")``; ``NATIVE_TARGETS`` is the table of targets; refusals raise
:class:`ExportError` before anything is written.
"""

from .errors import ExportError
from .exporter import ExportResult, export_native
from .targets import NATIVE_TARGETS, TARGET_CHOICES, NativeTarget

__all__ = ["NATIVE_TARGETS", "TARGET_CHOICES", "ExportError", "ExportResult", "NativeTarget", "export_native"]
