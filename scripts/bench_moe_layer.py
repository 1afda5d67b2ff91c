"""MoE block speed against the ideal (k x the dense MLP) and Transformers' own Mixtral block, same weights.

    python scripts/bench_moe_layer.py [--tokens 1024 4096] [--dtypes float32 bfloat16] [--passes fwd fwd+bwd]
                                      [--repeats 10] [--warmup 2] [--keep-grads]

Shapes of a 0.5B model: hidden 896, intermediate 4864, 8 experts, top-2. Every figure is a ratio to the
ideal measured in the same run: a dense MLP applied to k x tokens (the same matmul FLOPs as the experts).
Forward and forward+backward, median of ``--repeats`` after warm-up, interleaved to share the machine's noise.
Parameter gradients are reset to None before every pass, as ``optimizer.zero_grad()`` does, so autograd hands
the fresh gradients over; ``--keep-grads`` accumulates them instead (a gradient-accumulation micro-step).

Columns: the ideal, Transformers' Mixtral block (``eager`` loop and ``grouped_mm``), our block with
Transformers' ``grouped_mm`` experts kernel, and our block as it runs by default (``upcycled_default``:
``sorted_mm`` on CPU, ``grouped_mm`` on accelerators). Before timing, the default kernel's output and
gradients are checked against the eager loop (float32).

What it does not measure: the rest of the model (attention, embeddings, the LM head, the router losses, the
optimizer step) and memory as a training step leaves it. One block runs alone, so every pass gets back from the
allocator the buffers the previous pass of the same block freed; in training, other layers, the optimizer and
the 8x larger expert gradients (fresh pages after ``zero_grad(set_to_none=True)``) sit between two calls. For a
whole step, several per process, see ``scripts/bench_train_step.py``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from transformers import LlamaConfig, MixtralConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moe_upcycle import UpcycledMoeConfig
from moe_upcycle.modeling.modeling_upcycled_moe import DEFAULT_EXPERTS_IMPLEMENTATION, UpcycledSparseMoeBlock

H, I, E, K = 896, 4864, 8, 2


def build_ours() -> tuple[LlamaMLP, UpcycledSparseMoeBlock]:
    """The dense MLP and our block (``grouped_mm`` experts), float32, seeded."""
    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=14)
    dense = LlamaMLP(text)
    moe_config = UpcycledMoeConfig(text_config=text, num_experts=E, num_experts_per_tok=K)
    moe_config._experts_implementation = "grouped_mm"
    return dense, UpcycledSparseMoeBlock(moe_config, act_fn=dense.act_fn)


def build(dtype: torch.dtype) -> dict[str, nn.Module]:
    dense, ours = build_ours()
    mix_config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    blocks = {}
    for implementation in ("eager", "grouped_mm"):
        config = copy.deepcopy(mix_config)  # the experts keep a reference to their config: one per block
        config._experts_implementation = implementation
        block = MixtralSparseMoeBlock(config)
        block.load_state_dict({"gate.weight": ours.gate.weight.data, "experts.gate_up_proj": ours.experts.gate_up_proj.data,
                               "experts.down_proj": ours.experts.down_proj.data})
        blocks[f"mixtral {implementation}"] = block
    modules = {"ideal (k x dense MLP)": dense, **blocks, "ours grouped_mm": ours,
               "ours default": with_experts_implementation(ours, DEFAULT_EXPERTS_IMPLEMENTATION)}
    return {name: m.to(dtype) for name, m in modules.items()}


def with_experts_implementation(block: UpcycledSparseMoeBlock, implementation: str) -> UpcycledSparseMoeBlock:
    """A copy of ``block`` (same weights, its own config) whose experts run ``implementation``."""
    block = copy.deepcopy(block)
    block.experts.config._experts_implementation = implementation
    return block


def check_default(tokens: int) -> None:
    """Print the max relative difference of the default kernel to the eager loop: output, input and weight gradients."""
    _, ours = build_ours()
    x = torch.randn(1, tokens, H)
    results = []
    for implementation in ("eager", DEFAULT_EXPERTS_IMPLEMENTATION):
        block = with_experts_implementation(ours, implementation)
        xx = x.clone().requires_grad_(True)
        out = block(xx)
        out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
        results.append({"output": out.detach(), "grad input": xx.grad,
                        **{f"grad {n}": p.grad for n, p in block.named_parameters() if p.grad is not None}})
    ref, new = results
    diffs = {n: ((new[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)).item() for n in ref}
    worst = max(diffs.values())
    print(f"default ({DEFAULT_EXPERTS_IMPLEMENTATION} on {x.device.type}) vs eager, float32, {tokens} tokens, "
          "max |diff| / max |eager|: "
          + ", ".join(f"{n} {d:.1e}" for n, d in diffs.items()) + f" -> {'OK' if worst <= 1e-5 else 'MISMATCH'}")


def timed(module: nn.Module, x: torch.Tensor, backward: bool, keep_grads: bool = False) -> float:
    if not keep_grads:
        for p in module.parameters():
            p.grad = None
    x = x.detach().requires_grad_(backward)
    start = time.perf_counter()
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    if backward:
        out.float().sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes per module before timing")
    parser.add_argument("--keep-grads", action="store_true", help="accumulate parameter gradients across passes")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; H={H} I={I} E={E} top-{K}; "
          f"gradients {'accumulated' if args.keep_grads else 'reset to None'} between passes")
    check_default(min(args.tokens))
    for index, dtype_name in enumerate(args.dtypes):
        dtype = getattr(torch, dtype_name)
        modules = build(dtype)
        if index == 0:
            print(f"{'tokens':>6} {'dtype':>9} {'pass':>8} | " + " | ".join(f"{n:>20}" for n in modules))
        for tokens in args.tokens:
            x = torch.randn(1, tokens, H, dtype=dtype)
            inputs = {name: (torch.randn(1, tokens * K, H, dtype=dtype) if name.startswith("ideal") else x) for name in modules}
            for backward in [p == "fwd+bwd" for p in args.passes]:
                times: dict[str, list[float]] = {name: [] for name in modules}
                for _ in range(args.warmup):
                    for name, module in modules.items():
                        timed(module, inputs[name], backward, args.keep_grads)
                for _ in range(args.repeats):
                    for name, module in modules.items():
                        times[name].append(timed(module, inputs[name], backward, args.keep_grads))
                medians = {name: statistics.median(t) for name, t in times.items()}
                ideal = medians["ideal (k x dense MLP)"]
                cells = " | ".join(f"{medians[n] * 1e3:8.1f} ms {medians[n] / ideal:5.2f}x" for n in modules)
                print(f"{tokens:>6} {dtype_name:>9} {'fwd+bwd' if backward else 'fwd':>8} | {cells}", flush=True)


if __name__ == "__main__":
    main()
