"""``moe-upcycle analyze MODEL --data NAME=FILE [NAME=FILE ...] [--output DIR]``: which experts each data set's
tokens go to, per MoE layer (the command-line face of :func:`moe_upcycle.analysis.analyze`)."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "analyze", help="share of each data set's tokens routed to each expert, per MoE layer, and each data set's loss",
        description="Run an upcycled (or native Mixtral / Qwen2-MoE / Qwen3-MoE) model over named text files and report, "
                    "per MoE layer, the share of each data set's tokens routed to each expert (a row sums to top_k), "
                    "plus each data set's loss and perplexity. With --output, writes routing.json and routing.png "
                    "(one heatmap panel per MoE layer: data sets as rows, experts as columns).",
    )
    p.add_argument("model", help="upcycled or native MoE model: folder or Hub id")
    p.add_argument("--data", nargs="+", action="extend", required=True, metavar="NAME=FILE",
                   help="named data sets: .txt, .json/.jsonl or .parquet files (repeatable)")
    p.add_argument("--output", default=None, help="folder to write routing.json and routing.png to (must not exist or be "
                                                  "empty, and never be or lie inside an input)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output written by moe-upcycle")
    p.add_argument("--text_column", default="text", help="column holding the text (JSON / parquet files)")
    p.add_argument("--block_size", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--batch_size", type=int, default=8, help="blocks per forward pass (default 8)")
    p.add_argument("--max_tokens", type=int, default=None, help="read at most this many tokens of each data set")
    p.add_argument("--per_layer", action="store_true", help="print one table per MoE layer (default: their mean)")
    p.add_argument("--trust_remote_code", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..analysis import HEATMAP_FILE, REPORT_FILE, analyze, parse_data_specs

    report = analyze(args.model, parse_data_specs(args.data), args.output, text_column=args.text_column,
                     block_size=args.block_size, batch_size=args.batch_size, max_tokens=args.max_tokens,
                     overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    print(f"{args.model}: MoE layers {', '.join(map(str, report.moe_layers))}; top-{report.top_k} of "
          f"{report.num_experts} experts")
    for layer in report.moe_layers if args.per_layer else [None]:
        print(report.table(layer))
    if args.output is not None:
        print(f"wrote {args.output}/{REPORT_FILE} and {args.output}/{HEATMAP_FILE}")
    return 0
