"""The sparse-upcycling quality experiment (Komatsuzaki et al. 2023) at small scale, on real text.

    python scripts/compare_upcycling.py [--corpus docs+stdlib] [--pretrain-steps 300] [--steps 600] [--out upcycling_experiment]

1. Pre-train a small dense Llama on real text: CPython's documentation prose (90% of its paragraphs) and, with
   ``--corpus docs+stdlib`` (the default), the standard library's own top-level modules (every 10th module
   held out), so that the continued training sees mostly new text instead of repeating 150k tokens.
2. From that checkpoint, continue training for the same number of tokens as
   (a) the dense model, (b) an upcycled MoE (8 experts, top-2, every layer), (c) Drop-Upcycling (r = 0.5);
   and (d) the dense model for as many more steps as gives it the MoE's training compute.
3. Report held-out validation loss at equal tokens ((b), (c) vs (a)) and at equal training compute
   ((b), (c) vs (d)), where compute is 6 x active parameters x tokens (forward + backward matmul FLOPs;
   Kaplan et al. 2020), and save a plot.
Same data order, batch, learning-rate schedule and seed for every arm; whatever the outcome, it is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import moe_upcycle
from moe_upcycle.demo import DemoModelSpec, build_demo_checkpoint, write_text_splits

BLOCK, BATCH = 128, 16


def write_corpus(folder: Path, corpus: str) -> tuple[Path, Path]:
    """train.txt / valid.txt: documentation paragraphs, plus standard-library source files for ``docs+stdlib``."""
    train_file, valid_file = write_text_splits(folder)
    if corpus == "docs":
        return train_file, valid_file
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    held_out = {f for i, f in enumerate(files) if i % 10 == 9}
    for path, chosen in ((train_file, [f for f in files if f not in held_out]), (valid_file, sorted(held_out))):
        path.write_text(path.read_text() + "".join("\n\n" + f.read_text(errors="replace") for f in chosen))
    return train_file, valid_file


def validation_blocks(valid_text: str, tokenizer, count: int = 64) -> torch.Tensor:
    """``count`` blocks spread evenly over the held-out text (prose and, for docs+stdlib, code alike)."""
    blocks = blocks_of(valid_text, tokenizer)
    return blocks[torch.linspace(0, blocks.shape[0] - 1, count).long()]


def blocks_of(text: str, tokenizer) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text)["input_ids"])
    n = ids.numel() // BLOCK
    return ids[: n * BLOCK].view(n, BLOCK)


@torch.no_grad()
def validation_loss(model, valid: torch.Tensor) -> float:
    model.eval()
    losses = [model.model(input_ids=b, labels=b).loss.item() if hasattr(model, "moe_blocks")
              else model(input_ids=b, labels=b).loss.item() for b in valid.split(32)]
    model.train()
    return sum(losses) / len(losses)


def active_parameters(model) -> int:
    total = sum(p.numel() for p in model.parameters())
    if not hasattr(model, "moe_blocks"):
        return total
    config = model.config
    experts = sum(p.numel() for b in model.moe_blocks() for p in b.experts.parameters())
    return total - experts * (config.num_experts - config.num_experts_per_tok) // config.num_experts


def train_arm(name: str, path: Path, train: torch.Tensor, valid: torch.Tensor, steps: int, eval_every: int,
              lr: float) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(1))
    active = active_parameters(model)
    curve = [{"step": 0, "tokens": 0, "flops": 0.0, "val_loss": validation_loss(model, valid)}]
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = order[((step - 1) * BATCH) % len(order):][:BATCH]
        if idx.numel() < BATCH:
            idx = order[:BATCH]
        batch = train[idx]
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % eval_every == 0 or step == steps:
            tokens = step * BATCH * BLOCK
            curve.append({"step": step, "tokens": tokens, "flops": 6.0 * active * tokens,
                          "val_loss": validation_loss(model, valid)})
            print(f"  {name:<16} step {step:>5}  val_loss {curve[-1]['val_loss']:.4f}  ({time.perf_counter() - start:.0f}s)",
                  flush=True)
    return {"name": name, "active_params": active, "curve": curve, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=["docs", "docs+stdlib"], default="docs+stdlib")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("upcycling_experiment"))
    args = parser.parse_args()
    out = args.out
    train_file, valid_file = write_corpus(out / "data", args.corpus)
    dense_dir = out / "dense"
    if not (dense_dir / "config.json").is_file():
        print(f"pre-training the dense Llama for {args.pretrain_steps} steps")
        build_demo_checkpoint(dense_dir, DemoModelSpec(train_steps=args.pretrain_steps), text=train_file.read_text())
    moe_upcycle.upcycle(dense_dir, out / "moe", num_experts=8, top_k=2, overwrite=True)
    moe_upcycle.upcycle(dense_dir, out / "drop", num_experts=8, top_k=2, drop_upcycling_ratio=0.5, overwrite=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(dense_dir)
    train, valid = blocks_of(train_file.read_text(), tokenizer), validation_blocks(valid_file.read_text(), tokenizer)
    print(f"corpus {args.corpus}: {train.numel() / 1e6:.2f}M training tokens; continuing each arm for {args.steps} steps "
          f"of {BATCH} x {BLOCK} tokens; {valid.shape[0]} validation blocks")
    arms = [train_arm(name, path, train, valid, args.steps, args.eval_every, args.lr)
            for name, path in (("dense", dense_dir), ("upcycled", out / "moe"), ("drop-upcycled", out / "drop"))]
    ratio = arms[1]["active_params"] / arms[0]["active_params"]
    long_steps = math.ceil(args.steps * ratio)
    arms.append(train_arm("dense, = compute", dense_dir, train, valid, long_steps, args.eval_every, args.lr))
    (out / "results.json").write_text(json.dumps(arms, indent=1) + "\n")

    print(f"\n{'arm':<18}{'steps':>6}{'active params':>14}{'tokens (M)':>11}{'TFLOPs':>8}{'val loss':>10}{'wall s':>8}")
    for arm in arms:
        final = arm["curve"][-1]
        print(f"{arm['name']:<18}{final['step']:>6}{arm['active_params']:>14,}{final['tokens'] / 1e6:>11.2f}"
              f"{final['flops'] / 1e12:>8.2f}{final['val_loss']:>10.4f}{arm['seconds']:>8.0f}")
    start = arms[0]["curve"][0]["val_loss"]
    print(f"\nstarting point (the dense checkpoint): {start:.4f}")
    for arm in arms[1:3]:
        final = arm["curve"][-1]["val_loss"]
        print(f"{arm['name']}: {final - arms[0]['curve'][-1]['val_loss']:+.4f} vs dense at equal tokens, "
              f"{final - arms[3]['curve'][-1]['val_loss']:+.4f} vs dense at equal compute")
    plot(arms, out / "upcycling_curves.png", args.corpus)
    print(f"plot: {out / 'upcycling_curves.png'}; raw curves: {out / 'results.json'}")


def plot(arms: list[dict], path: Path, corpus: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for arm in arms:
        curve = arm["curve"]
        axes[0].plot([c["tokens"] / 1e6 for c in curve], [c["val_loss"] for c in curve], marker="o", label=arm["name"])
        axes[1].plot([c["flops"] / 1e12 for c in curve], [c["val_loss"] for c in curve], marker="o", label=arm["name"])
    axes[0].set_xlabel("training tokens after the dense checkpoint (M)", fontsize=8)
    axes[1].set_xlabel("training compute after the checkpoint (TFLOPs = 6 x active params x tokens)", fontsize=8)
    for ax in axes:
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Continuing dense vs sparse upcycling ({corpus})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
