"""``moe-upcycle mix RECIPE.yaml OUTPUT``: one MoE from several models' MLPs (Branch-Train-MiX, mergekit-moe recipes)."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("mix", help="mix several fine-tuned models into one MoE (mergekit-moe recipes, Branch-Train-MiX)",
                       description="Each expert is one model's MLP; attention, norms and embeddings come from base_model "
                                   "or are the mean of the experts' models (nonexpert: average). The recipe is "
                                   "mergekit-moe's YAML (see configs/mix_btx_example.yaml).")
    p.add_argument("recipe", help="mergekit-moe style YAML recipe")
    p.add_argument("output", help="folder to write the MoE model to (must not exist or be empty)")
    p.add_argument("--verify", action="store_true", help="run the mixed model on a fixed batch (exact when every "
                                                         "tensor comes from one model, else finite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT that moe-upcycle wrote")
    p.add_argument("--allow-identical-sources", action="store_true",
                   help="mix experts whose MLPs are identical (useless without training; for tests)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..convert import mix

    result = mix(args.recipe, args.output, verify=args.verify, overwrite=args.overwrite,
                 allow_identical_sources=args.allow_identical_sources)
    print(f"wrote {result.output} in {result.seconds:.1f}s: {len(result.shards)} shard(s), "
          f"{result.bytes_written / 1e9:.3f} GB")
    print(f"MoE layers {result.moe_layers}; parameters {result.total_params:,} total, "
          f"{result.active_params:,} active per token")
    for note in result.notes:
        print(note)
    return 0
