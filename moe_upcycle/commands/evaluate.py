"""``moe-upcycle evaluate MODEL --validation_file FILE``: perplexity of any causal LM."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="perplexity of any causal LM on a validation file")
    p.add_argument("model", help="model folder or Hub id (dense or MoE)")
    p.add_argument("--validation_file", required=True, help=".txt, .json/.jsonl or .parquet file")
    p.add_argument("--text_column", default="text")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--output_json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--trust_remote_code", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..train.evaluate_file import evaluate_file

    result = evaluate_file(args.model, args.validation_file, text_column=args.text_column, block_size=args.block_size,
                           batch_size=args.batch_size, max_eval_samples=args.max_eval_samples,
                           trust_remote_code=args.trust_remote_code, output_json=args.output_json)
    print(f"{args.model}: eval_loss {result['eval_loss']:.4f}  perplexity {result['perplexity']:.2f}  "
          f"({result['tokens']:,} tokens)")
    return 0
