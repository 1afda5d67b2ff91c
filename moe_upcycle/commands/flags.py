"""Flags that several subcommands share, declared once."""

from __future__ import annotations

import argparse


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """``--overwrite`` and ``--max-shard-size`` of commands that write an upcycled checkpoint folder."""
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT that moe-upcycle wrote")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")


def add_routing_flags(p: argparse.ArgumentParser, max_tokens: int, condition: str = "") -> None:
    """``--block-size`` and ``--max-tokens`` of commands that route ``--data`` through the model (``condition``: when
    the flags apply, e.g. ``"--bits auto: "``)."""
    p.add_argument("--block-size", type=int, default=256, help=f"{condition}tokens per routed block (default 256)")
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"{condition}route at most this many tokens (default {max_tokens})")
