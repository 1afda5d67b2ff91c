"""``moe-upcycle shrink MODEL OUT --num-experts N --data FILE [--method merge|prune]``."""

from __future__ import annotations

import argparse

from .flags import add_output_flags, add_routing_flags


def add(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("shrink", help="reduce every MoE layer to N experts: prune the least used, or merge by routing "
                                      "similarity (MC-SMoE)",
                       description="Route --data through the model; prune keeps the N most used experts per layer, merge "
                                   "groups the others with the most similar of those (router logits) and averages each "
                                   "group weighted by usage (MC-SMoE, arXiv 2310.01334).")
    p.add_argument("model", help="upcycled model folder (convert, mix, train or merge output)")
    p.add_argument("output", help="folder to write the smaller model to (must not exist or be empty)")
    p.add_argument("--num-experts", type=int, required=True, metavar="N", help="experts per MoE layer to keep")
    p.add_argument("--data", required=True, metavar="FILE", help=".txt, .json/.jsonl or .parquet text to route")
    p.add_argument("--method", choices=("merge", "prune"), default="merge", help="merge (default) or prune")
    add_routing_flags(p, max_tokens=200_000)
    add_output_flags(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..convert.shrink import shrink

    result = shrink(args.model, args.output, num_experts=args.num_experts, data=args.data, method=args.method,
                    block_size=args.block_size, max_tokens=args.max_tokens, overwrite=args.overwrite,
                    max_shard_size=args.max_shard_size)
    print(f"wrote {result.output} in {result.seconds:.1f}s: {len(result.shards)} shard(s); parameters "
          f"{result.total_params:,} total, {result.active_params:,} active per token")
    return 0
