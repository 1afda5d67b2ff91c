"""YAML recipes as argument defaults: ``--config FILE.yaml`` for ``moe-upcycle convert`` and ``train``.

Keys are the flag names without ``--`` (dashes or underscores); command-line flags override the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from .errors import InvalidOptionError


def apply_yaml_defaults(parser: argparse.ArgumentParser, path: Path | None) -> None:
    """Set ``parser``'s defaults from the mapping in ``path``; unknown keys are an error naming them."""
    if path is None:
        return
    if not path.is_file():
        raise InvalidOptionError(f"--config {path} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise InvalidOptionError(f"{path} must hold a mapping of argument names to values")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    valid = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise InvalidOptionError(f"{path}: unknown keys {unknown}; keys are the flag names without --")
    parser.set_defaults(**values)
    for action in parser._actions:  # required arguments given in the file are satisfied by its defaults
        if action.dest in values:
            action.required = False


def config_path(argv: list[str]) -> tuple[Path | None, list[str]]:
    """Split ``--config FILE`` off ``argv``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, rest = pre.parse_known_args(argv)
    return known.config, rest
