"""Training throughput and peak memory: dense model vs upcycled model with LoRA vs upcycled model fully fine-tuned.

    python scripts/bench_train.py [--steps 10] [--batch 8] [--seq 256] [--rounds 3] [--experts-implementation grouped_mm]

Same batch, sequence length and optimizer (AdamW) for all three; the MoE model is the dense Llama
upcycled to 8 experts / top-2 on every layer, its experts on the default kernel unless
``--experts-implementation`` names another. Each run is a fresh process, ``--rounds`` times in
alternation (tokens/s is the median); peak memory is that process's high-water RSS (VmHWM) minus its RSS
before the model was built, so imports are not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

CHILD = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
import moe_upcycle
from moe_upcycle.train.args import MoeArguments
from moe_upcycle.train.lora import prepare_model

def rss(field):
    return int([l for l in open('/proc/self/status') if l.startswith(field)][0].split()[1]) * 1024

path, mode, steps, batch, seq, kernel = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
base = rss('VmRSS')
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
if kernel and mode != 'dense':
    model.set_experts_implementation(kernel)
if mode == 'lora':
    model = prepare_model(model, MoeArguments(use_lora=True, lora_target='attention,experts,router'))
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch, seq))
times = []
for step in range(steps + 2):
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
steady = sorted(times[2:])[len(times[2:]) // 2]
print(json.dumps({"tokens_per_s": batch * seq / steady, "peak_gb": (rss('VmHWM') - base) / 1e9}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per run; the median is reported")
    parser.add_argument("--experts-implementation", default="", help="experts kernel of the MoE runs (default: the model's)")
    args = parser.parse_args()
    import moe_upcycle
    from moe_upcycle.demo import DemoModelSpec, build_demo_checkpoint
    from moe_upcycle.modeling.modeling_upcycled_moe import DEFAULT_EXPERTS_IMPLEMENTATION

    with tempfile.TemporaryDirectory() as tmp:
        dense = build_demo_checkpoint(Path(tmp) / "dense", DemoModelSpec(train_steps=0), log=lambda *_: None)
        moe = Path(tmp) / "moe"
        moe_upcycle.upcycle(dense, moe, num_experts=8, top_k=2)
        kernel = args.experts_implementation or DEFAULT_EXPERTS_IMPLEMENTATION
        print(f"dense Llama (4 layers, hidden 128, intermediate 352) vs 8 experts / top-2 ({kernel} experts kernel); "
              f"batch {args.batch} x {args.seq} tokens, AdamW, median of {args.steps} steps, "
              f"median over {args.rounds} interleaved rounds")
        runs = {"dense, full fine-tuning": (dense, "dense"), "MoE + LoRA": (moe, "lora"), "MoE, full fine-tuning": (moe, "full")}
        results: dict[str, list[dict]] = {name: [] for name in runs}
        for _ in tqdm(range(args.rounds), desc="rounds"):  # interleaved, so the machine's noise hits every run alike
            for name, (path, mode) in runs.items():
                out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(args.steps), str(args.batch),
                                      str(args.seq), args.experts_implementation], capture_output=True, text=True, check=True)
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{'run':<28}{'tokens/s':>10}{'vs dense':>10}{'peak GB':>9}")
        speed = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in results.items()}
        for name, rs in results.items():
            print(f"{name:<28}{speed[name]:>10.0f}{speed[name] / speed['dense, full fine-tuning']:>9.2f}x"
                  f"{max(r['peak_gb'] for r in rs):>9.2f}")

if __name__ == "__main__":
    main()
