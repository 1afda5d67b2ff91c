"""Errors raised on bad input. Each message names the problem and how to fix it; the CLI prints it as one line."""

from __future__ import annotations


class UpcycleError(Exception):
    """Base class of every error moe-upcycle raises for bad input."""


class InvalidOptionError(UpcycleError, ValueError):
    """An option has a value that is not allowed, or options contradict each other."""


class UnsupportedArchitectureError(UpcycleError, ValueError):
    """The source model's family has no architecture adapter."""


class SourceNotFoundError(UpcycleError, FileNotFoundError):
    """The source is neither a local folder nor a reachable Hub repository."""


class CheckpointError(UpcycleError):
    """The source checkpoint's weight files are missing, corrupt, pickled or inconsistent with its config."""


class OutputError(UpcycleError):
    """The output cannot be written (disk full, read-only or missing parent, name too long, ...)."""


class OutputExistsError(OutputError, FileExistsError):
    """The output folder exists and is not empty, and overwriting was not asked for."""


class VerificationError(UpcycleError):
    """The converted model does not compute what the dense model did, although the recipe is exact."""
