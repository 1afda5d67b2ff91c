"""Shared-weight LoRA experts (``--expert-sharing lora``) against the dense MLP and full experts, same tokens.

    python scripts/bench_shared_experts.py [--tokens 1024 4096] [--rank 16] [--repeats 10] [--warmup 2]

Shapes of a 0.5B model (hidden 896, intermediate 4864, 8 experts, top-2), float32. Columns, each a ratio to the
dense MLP on the same T tokens, measured interleaved in one process: the dense MLP, our full-experts block as it
runs by default (k expert MLPs per token: about 2x by construction), and the shared-weight block with its MLP
frozen as ``moe-upcycle train`` freezes it (forward+backward then computes no gradient for the shared MLP, as in
training) with the ``shared_lora`` kernel and with the eager reference. Before timing, the kernel's output and
gradients are checked against the reference.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from bench_moe_layer import E, H, K, build_ours, timed  # the 0.5B shapes and the timing of one pass
from transformers import LlamaConfig

from moe_upcycle import UpcycledMoeConfig
from moe_upcycle.modeling.modeling_upcycled_moe import DEFAULT_EXPERTS_IMPLEMENTATION, UpcycledSparseMoeBlock


def shared_block(dense: torch.nn.Module, rank: int, implementation: str) -> UpcycledSparseMoeBlock:
    """Our block with shared-weight experts over ``dense``'s weights, random non-zero deltas, shared MLP frozen."""
    text = LlamaConfig(hidden_size=H, intermediate_size=dense.intermediate_size, num_hidden_layers=1,
                       num_attention_heads=14)
    config = UpcycledMoeConfig(text_config=text, num_experts=E, num_experts_per_tok=K, expert_sharing="lora",
                               expert_lora_rank=rank, expert_lora_alpha=2.0 * rank, expert_lora_targets=["up", "down"])
    config._experts_implementation = implementation
    torch.manual_seed(1)
    block = UpcycledSparseMoeBlock(config, act_fn=dense.act_fn)
    with torch.no_grad():
        experts = block.experts
        experts.gate_up_proj.copy_(torch.cat([dense.gate_proj.weight, dense.up_proj.weight]))
        experts.down_proj.copy_(dense.down_proj.weight)
        for param in experts.deltas.parameters():
            param.normal_(std=0.02)
        experts.gate_up_proj.requires_grad_(False)
        experts.down_proj.requires_grad_(False)
    return block


def check(kernel: torch.nn.Module, reference: torch.nn.Module, tokens: int) -> None:
    x = torch.randn(1, tokens, H)
    results = []
    for block in (reference, kernel):
        xx = x.clone().requires_grad_(True)
        out = block(xx)
        out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(2)))
        results.append({"output": out.detach(), "grad input": xx.grad,
                        **{f"grad {n}": p.grad for n, p in block.named_parameters() if p.grad is not None}})
        block.zero_grad(set_to_none=True)
    ref, new = results
    diffs = {n: ((new[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)).item() for n in ref}
    worst = max(diffs.values())
    print(f"shared_lora kernel vs eager reference, {tokens} tokens, max |diff| / max |ref| over output and "
          f"{len(diffs) - 1} gradients: {worst:.1e} -> {'OK' if worst <= 1e-5 else 'MISMATCH'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    dense, full = build_ours()
    full = copy.deepcopy(full)
    full.experts.config._experts_implementation = DEFAULT_EXPERTS_IMPLEMENTATION
    modules = {"dense MLP": dense, "full experts": full, "shared kernel": shared_block(dense, args.rank, "shared_lora"),
               "shared eager": shared_block(dense, args.rank, "eager")}
    check(modules["shared kernel"], modules["shared eager"], min(args.tokens))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; H={H} I={dense.intermediate_size} E={E} "
          f"top-{K} r={args.rank}, float32; ratios to the dense MLP on the same tokens")
    print(f"{'tokens':>6} {'pass':>8} | " + " | ".join(f"{n:>19}" for n in modules))
    for tokens in args.tokens:
        x = torch.randn(1, tokens, H)
        for backward in (False, True):
            times: dict[str, list[float]] = {name: [] for name in modules}
            for _ in range(args.warmup):
                for module in modules.values():
                    timed(module, x, backward)
            for _ in range(args.repeats):
                for name, module in modules.items():
                    times[name].append(timed(module, x, backward))
            medians = {name: statistics.median(t) for name, t in times.items()}
            cells = " | ".join(f"{medians[n] * 1e3:7.1f} ms {medians[n] / medians['dense MLP']:5.2f}x" for n in modules)
            print(f"{tokens:>6} {'fwd+bwd' if backward else 'fwd':>8} | {cells}", flush=True)


if __name__ == "__main__":
    main()
