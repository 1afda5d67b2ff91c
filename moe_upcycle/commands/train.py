"""``moe-upcycle train [flags]``: the Trainer recipe. Its flags belong to ``HfArgumentParser`` (see ``train/args.py``),
so argparse only lists it; ``cli.main`` hands the raw arguments to :func:`run`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser("train", help="fine-tune with the Trainer (flags: `moe-upcycle train --help`)", add_help=False)


def run(argv: Sequence[str]) -> int:
    from ..train import run_training

    run_training(argv)
    return 0
