"""``moe-upcycle convert SOURCE OUTPUT [options]``: upcycle a dense checkpoint (flags come from ``UpcycleOptions``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..convert.options import add_option_arguments

    p = sub.add_parser("convert", help="upcycle a dense checkpoint into a sparse MoE checkpoint",
                       description="Upcycle a dense causal LM (local folder or Hub id) into a sparse MoE model.")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="recipe file whose keys are these flags without -- (see configs/); flags override it")
    p.add_argument("source", help="local folder or Hub model id of the dense model")
    p.add_argument("output", help="folder to write the MoE model to (must not exist or be empty)")
    add_option_arguments(p)
    p.set_defaults(func=run, recipe_file=True)
    return p


def run(args: argparse.Namespace) -> int:
    from ..convert import upcycle
    from ..convert.options import options_from_namespace

    options = options_from_namespace(args)
    result = upcycle(args.source, args.output, options)
    print(f"wrote {result.output} in {result.seconds:.1f}s: {len(result.shards)} shard(s), "
          f"{result.bytes_written / 1e9:.3f} GB")
    print(f"MoE layers {result.moe_layers}; {options.num_experts} experts, top-{options.top_k}; "
          f"parameters {result.total_params:,} total, {result.active_params:,} active per token")
    for note in result.notes:
        print(note)
    return 0
