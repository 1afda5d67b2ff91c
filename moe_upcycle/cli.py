"""``moe-upcycle`` command line: the parser built from ``commands.COMMANDS`` (one module per subcommand).

Bad input ends with one ``moe-upcycle: error: ...`` line on stderr and exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .commands import COMMANDS, train
from .errors import UpcycleError
from .yaml_config import apply_yaml_defaults, config_path


class _CommandsFormatter(argparse.HelpFormatter):
    """argparse measures subcommand names one indent level shallower than it prints them, so a long name
    (``materialize``) gets its help on the next line; measure them where they are printed."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        for choice in getattr(action, "_choices_actions", ()):
            width = len(self._format_action_invocation(choice)) + self._current_indent + 2 * self._indent_increment
            self._action_max_length = max(self._action_max_length, width)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-upcycle", formatter_class=_CommandsFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands (`moe-upcycle COMMAND --help` for each one's flags)")
    for command in COMMANDS:
        command.add(sub)
    for subparser in sub.choices.values():
        _accept_both_spellings(subparser)
    parser.description = ("Upcycle dense Transformers models into sparse Mixture-of-Experts models, then fine-tune, "
                          f"evaluate, export and publish them. Commands: {', '.join(sub.choices)}.")
    return parser


def _accept_both_spellings(parser: argparse.ArgumentParser) -> None:
    """Give every ``--long_flag`` its other spelling (``--long-flag``), as ``HfArgumentParser`` does for ``train``."""
    for action in list(parser._actions):
        for option in list(action.option_strings):
            if not option.startswith("--"):
                continue
            body = option[2:]
            other = "--" + (body.replace("-", "_") if "-" in body else body.replace("_", "-"))
            if other != option and other not in parser._option_string_actions:
                action.option_strings.append(other)
                parser._option_string_actions[other] = action


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return _subparsers(parser)[name]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["train"]:  # HfArgumentParser owns the training flags
            return train.run(argv[1:])
        parser = build_parser()
        if argv[:1] and argv[0] in _subparsers(parser):
            command = _subparsers(parser)[argv[0]]
            if command.get_default("recipe_file"):  # a recipe file supplies this parser's defaults
                config, _ = config_path(argv[1:])
                apply_yaml_defaults(command, config)
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except UpcycleError as err:
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"moe-upcycle: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-upcycle: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
