"""``moe-upcycle demo``: the embedded end-to-end run (no Hub)."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="build a small dense Llama locally, upcycle it, verify it and generate")
    p.add_argument("--workdir", default="demo_run", help="folder for the demo's outputs (default demo_run)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..demo import run as run_demo

    return run_demo(args.workdir)
