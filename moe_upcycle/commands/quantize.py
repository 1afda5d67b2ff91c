"""``moe-upcycle quantize IN OUT --experts int8|int4 [--group-size 64]`` or ``--bits auto --target-bits B --data FILE``."""

from __future__ import annotations

import argparse

from ..modeling.quantized_experts import QUANT_SCHEMES
from .flags import add_output_flags, add_routing_flags


def add(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("quantize", help="store the experts in 8 or 4 bits, or a precision per expert (--bits auto)",
                       description="Write the upcycled model with each MoE layer's expert weights as integers with "
                                   "scales (int8: one scale per output row; int4: two values per byte, one scale per "
                                   "group of input columns); routers, attention, norms and embeddings stay as they are. "
                                   "The output loads with from_pretrained and needs no quantisation library "
                                   "(--backend torchao: torchao's int8 tensors instead, which need torchao).")
    p.add_argument("model", help="upcycled model folder (convert, mix, train, merge or shrink output)")
    p.add_argument("output", help="folder to write the quantised model to (must not exist or be empty)")
    p.add_argument("--experts", choices=tuple(QUANT_SCHEMES), default=None,
                   help="scheme of every expert with --bits uniform (default int8)")
    p.add_argument("--group-size", type=int, default=64, help="input columns per int4 scale (default 64)")
    p.add_argument("--bits", choices=("uniform", "auto"), default="uniform",
                   help="uniform: every expert in --experts; auto: a precision per expert from --data (MC-MoE)")
    p.add_argument("--target-bits", type=float, default=None, metavar="B",
                   help="--bits auto: average bits per expert weight, scales included (e.g. 5)")
    p.add_argument("--data", default=None, metavar="FILE", help="--bits auto: .txt, .json/.jsonl or .parquet text")
    p.add_argument("--backend", choices=("native", "torchao"), default="native",
                   help="native (default): our integer schemes, no library needed to load; torchao: torchao's int8 "
                        "weight-only tensors (--experts int8 only; torchao needed to write and load, eager experts kernel)")
    add_routing_flags(p, max_tokens=50_000, condition="--bits auto: ")
    add_output_flags(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..convert.quantize import quantize
    from ..errors import InvalidOptionError

    if args.bits == "auto" and args.experts is not None:
        raise InvalidOptionError("--experts sets one scheme for every expert; --bits auto chooses per expert: give one")
    result = quantize(args.model, args.output, experts=args.experts or "int8", group_size=args.group_size,
                      bits=args.bits, target_bits=args.target_bits, data=args.data, block_size=args.block_size,
                      max_tokens=args.max_tokens, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                      backend=args.backend)
    print(f"wrote {result.output} in {result.seconds:.1f}s: {len(result.shards)} shard(s), "
          f"{result.bytes_written / 1e9:.3f} GB")
    for note in result.notes:
        print(note)
    return 0
