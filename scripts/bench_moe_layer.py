"""MoE block speed against the ideal (k x the dense MLP) and Transformers' own Mixtral block, same weights.

    python scripts/bench_moe_layer.py [--tokens 1024 4096] [--dtypes float32 bfloat16] [--repeats 10]

Shapes of a 0.5B model: hidden 896, intermediate 4864, 8 experts, top-2. Every figure is a ratio to the
ideal measured in the same run: a dense MLP applied to k x tokens (the same matmul FLOPs as the experts).
Forward and forward+backward, median of ``--repeats`` after warm-up, interleaved to share the machine's noise.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from transformers import LlamaConfig, MixtralConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moe_upcycle import UpcycledMoeConfig
from moe_upcycle.modeling.modeling_upcycled_moe import UpcycledSparseMoeBlock

H, I, E, K = 896, 4864, 8, 2


def build(dtype: torch.dtype) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=14)
    dense = LlamaMLP(text)
    moe_config = UpcycledMoeConfig(text_config=text, num_experts=E, num_experts_per_tok=K)
    ours = UpcycledSparseMoeBlock(moe_config, act_fn=dense.act_fn)
    mix_config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    blocks = {}
    for implementation in ("eager", "grouped_mm"):
        mix_config._experts_implementation = implementation
        block = MixtralSparseMoeBlock(mix_config)
        block.load_state_dict({"gate.weight": ours.gate.weight.data, "experts.gate_up_proj": ours.experts.gate_up_proj.data,
                               "experts.down_proj": ours.experts.down_proj.data})
        blocks[f"mixtral {implementation}"] = block
    moe_config._experts_implementation = "grouped_mm"
    modules = {"ideal (k x dense MLP)": dense, **blocks, "moe-upcycle": ours}
    return {name: m.to(dtype) for name, m in modules.items()}


def timed(module: nn.Module, x: torch.Tensor, backward: bool) -> float:
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
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; H={H} I={I} E={E} top-{K}")
    print(f"{'tokens':>6} {'dtype':>9} {'pass':>8} | " + " | ".join(f"{n:>20}" for n in build(torch.float32)))
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        modules = build(dtype)
        for tokens in args.tokens:
            x = torch.randn(1, tokens, H, dtype=dtype)
            inputs = {name: (torch.randn(1, tokens * K, H, dtype=dtype) if name.startswith("ideal") else x) for name in modules}
            for backward in (False, True):
                times: dict[str, list[float]] = {name: [] for name in modules}
                for _ in range(2):  # warm-up
                    for name, module in modules.items():
                        timed(module, inputs[name], backward)
                for _ in range(args.repeats):
                    for name, module in modules.items():
                        times[name].append(timed(module, inputs[name], backward))
                medians = {name: statistics.median(t) for name, t in times.items()}
                ideal = medians["ideal (k x dense MLP)"]
                cells = " | ".join(f"{medians[n] * 1e3:8.1f} ms {medians[n] / ideal:5.2f}x" for n in modules)
                print(f"{tokens:>6} {dtype_name:>9} {'fwd+bwd' if backward else 'fwd':>8} | {cells}", flush=True)


if __name__ == "__main__":
    main()
