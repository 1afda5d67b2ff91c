"""``moe-upcycle merge ADAPTER OUTPUT``: fold a LoRA adapter into its base model."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model and save a full model")
    p.add_argument("adapter_dir", help="folder written by `moe-upcycle train --use_lora`")
    p.add_argument("output", help="folder for the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUTPUT")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..train.merge import merge_to_folder

    out = merge_to_folder(args.adapter_dir, args.output, overwrite=args.overwrite)
    print(f"wrote the merged model to {out}")
    return 0
