"""``moe-upcycle shrink MODEL OUT --num-experts N --data FILE [--method merge|prune]``."""

from __future__ import annotations

import argparse


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
    p.add_argument("--block-size", type=int, default=256, help="tokens per routed block (default 256)")
    p.add_argument("--max-tokens", type=int, default=200_000, help="route at most this many tokens (default 200000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT that moe-upcycle wrote")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
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
