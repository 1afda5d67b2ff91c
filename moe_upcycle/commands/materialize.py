"""``moe-upcycle materialize IN OUT``: shared-weight LoRA experts -> full experts (then ``export`` applies)."""

from __future__ import annotations

import argparse

from .flags import add_output_flags


def add(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("materialize", help="fold shared-weight LoRA experts into full experts (W + alpha/r B_e A_e)",
                       description="Write each expert's full weights of a `convert --expert-sharing lora` model (after "
                                   "training or not) as an ordinary upcycled checkpoint, which `moe-upcycle export` maps "
                                   "to native Mixtral / Qwen-MoE classes.")
    p.add_argument("folder", help="folder of a model converted with --expert-sharing lora (or trained from one)")
    p.add_argument("output", help="folder to write the full-experts model to (must not exist or be empty)")
    add_output_flags(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..convert.materialize import materialize

    result = materialize(args.folder, args.output, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(f"wrote {result.output} in {result.seconds:.1f}s: {len(result.shards)} shard(s), "
          f"{result.bytes_written / 1e9:.3f} GB; parameters {result.total_params:,} total, "
          f"{result.active_params:,} active per token")
    return 0
