"""One module per ``moe-upcycle`` subcommand: each declares ``add(subparsers)`` (its flags, ``func`` = its runner).

``COMMANDS`` is the order ``moe-upcycle --help`` lists them in; a new subcommand is one module and one entry here.
``train`` parses its own flags with ``HfArgumentParser`` and is dispatched before argparse (see ``cli.main``).
"""

from . import analyze, convert, demo, evaluate, export, materialize, merge, mix, push, quantize, shrink, train

COMMANDS = (convert, mix, train, merge, evaluate, analyze, shrink, push, materialize, quantize, export, demo)

__all__ = ["COMMANDS"]
