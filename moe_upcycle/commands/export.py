"""``moe-upcycle export FOLDER OUTPUT --to TARGET``: the command-line face of :func:`export_native`."""

from __future__ import annotations

import argparse

from ..export.targets import TARGET_CHOICES


def add(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export`` on ``subparsers`` (of ``moe-upcycle``); its ``func`` prints a summary and notes, returns 0."""
    p = subparsers.add_parser(
        "export", help="export an upcycled checkpoint to its native Transformers MoE class (Mixtral, Qwen2-MoE, ...)",
        description="Export an upcycled checkpoint to the native Transformers MoE class that computes the same function "
                    "(llama/mistral -> mixtral, qwen2 -> qwen2_moe, qwen3 -> qwen3_moe, olmo2 -> flex_olmo, "
                    "granite -> granitemoe; LLaVA-style VLMs get the MoE text config, qwen3_vl -> qwen3_vl_moe); the "
                    "result loads without moe_upcycle or trust_remote_code.",
    )
    p.add_argument("folder", help="folder of an upcycled checkpoint (output of `moe-upcycle convert` or `merge`)")
    p.add_argument("output", help="folder to write the native checkpoint to (must not exist or be empty)")
    p.add_argument("--to", default="auto", choices=TARGET_CHOICES, help="native target (default auto: the source family's twin)")
    p.add_argument("--dequantize", action="store_true",
                   help="a quantised checkpoint (moe-upcycle quantize): write its experts' dequantised float values")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUTPUT")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``export_native`` with the parsed flags and print its one-line summary, then its notes (what the native
    class does differently, e.g. router losses it does not carry over)."""
    from ..export import export_native

    result = export_native(args.folder, args.output, to=args.to, overwrite=args.overwrite,
                           max_shard_size=args.max_shard_size, dequantize=args.dequantize)
    print(result.summary())
    for note in result.notes:
        print(f"note: {note}")
    return 0

