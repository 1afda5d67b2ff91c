"""The error raised when an upcycled checkpoint has no exact native Transformers twin."""

from __future__ import annotations

from ..errors import UpcycleError


class ExportError(UpcycleError, ValueError):
    """The checkpoint cannot be exported to the asked native MoE class exactly; the message says why.

    Raised before anything is written: the output folder is never created.
    """


__all__ = ["ExportError"]
