"""YAML recipes as argument defaults: ``--config FILE.yaml`` for ``moe-upcycle convert`` and ``train``.

Keys are the flag names without ``--`` (dashes or underscores); command-line flags override the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from transformers.hf_argparser import string_to_bool

from .errors import InvalidOptionError


def read_yaml(path: Path, what: str) -> Any:
    """The document in the YAML file ``path`` (``what`` names it in errors: ``--config``, ``mix recipe``, ...); a
    missing or unreadable file and a syntax error (with its line) are one :class:`InvalidOptionError` each."""
    if not path.is_file():
        raise InvalidOptionError(f"{what} {path} does not exist (or is not a file)")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise InvalidOptionError(f"{what} {path} is not valid YAML{line}: {getattr(err, 'problem', None) or err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidOptionError(f"cannot read {what} {path}: {err}") from None


def apply_yaml_defaults(parser: argparse.ArgumentParser, path: Path | None) -> None:
    """Set ``parser``'s defaults from the mapping in ``path``; unknown keys are an error naming them."""
    if path is None:
        return
    values = read_yaml(path, "--config") or {}
    if not isinstance(values, dict):
        raise InvalidOptionError(f"{path} must hold a mapping of argument names to values")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    actions = {action.dest: action for action in parser._actions}  # a key is a flag name or its destination
    actions |= {flag.lstrip("-").replace("-", "_"): action for action in parser._actions for flag in action.option_strings}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise InvalidOptionError(f"{path}: unknown keys {unknown}; keys are the flag names without --")
    values = {actions[key].dest: _typed(path, key, value, actions[key]) for key, value in values.items()}
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


def _typed(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    """``value`` checked as strictly as the flag would be on the command line: a string is not a boolean, a
    boolean is not a number, a choice must be one of the choices. Numbers written as strings (``1e-4``, which
    YAML reads as a string) are converted by the flag's own type, as on the command line."""
    if value is None and action.default is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or action.type is string_to_bool:
        if not isinstance(value, bool):
            raise InvalidOptionError(f"{path}: {key}: {value!r} is not a boolean; write true or false (unquoted)")
        return value
    if action.nargs in ("+", "*"):
        return [_typed_item(path, key, item, action) for item in (value if isinstance(value, list) else [value])]
    return _typed_item(path, key, value, action)


def _typed_item(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    if isinstance(value, (bool, dict)) or (isinstance(value, list) and action.type in (int, float)):
        raise InvalidOptionError(f"{path}: {key}: {value!r} is not {_expected(action)}")
    if action.type in (int, float) or action.choices is not None:
        converter = action.type or str
        try:
            converted = converter(value) if isinstance(value, str) or action.type is float else value
        except (TypeError, ValueError):
            raise InvalidOptionError(f"{path}: {key}: {value!r} is not {_expected(action)}") from None
        if action.type is int and not isinstance(converted, int):
            raise InvalidOptionError(f"{path}: {key}: {value!r} is not {_expected(action)}")
        if action.choices is not None and converted not in action.choices:
            raise InvalidOptionError(f"{path}: {key}: {value!r} is not {_expected(action)}")
        return converted
    return value


def _expected(action: argparse.Action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    return {int: "an integer", float: "a number"}.get(action.type, "a string")
