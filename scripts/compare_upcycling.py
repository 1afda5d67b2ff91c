"""The sparse-upcycling quality experiment (Komatsuzaki et al. 2023) at small scale, on real text, swept over
how long the dense source was trained.

    python scripts/compare_upcycling.py --pretrain-steps 300 1000 3000 6000 --steps 600 \\
        --out upcycling_experiment --figure scripts/figures/upcycling_sweep.png

These are the defaults: 4.2 minutes on one H200 (float32; the source's 6000 steps take 2.2 minutes, the 16
arms 1.5 minutes as 16 processes sharing the GPU, ``--workers``). A quick CPU check:
``--pretrain-steps 20 40 --steps 20 --eval-every 10``.

1. Corpus: CPython's documentation prose (90% of its paragraphs) and, with ``--corpus docs+stdlib`` (the
   default), the standard library's own top-level modules (every 10th module held out); a byte-level BPE
   tokenizer is trained on the training text.
2. Pre-train the demo-sized dense Llama (4 layers, hidden 128) once, for the longest sweep point, with the
   T5 checkpoints' learning-rate shape (warm-up, constant, then 1/sqrt(step)), saving a checkpoint at every
   ``--pretrain-steps`` point and logging its training and validation loss: the source's loss curve.
3. From each checkpoint, continue for ``--steps`` steps as (a) the dense model, (b) an upcycled MoE
   (8 experts, top-2, every layer), (c) Drop-Upcycling (r = 0.5), and (d) the dense model for as many more
   steps as gives it the MoE's training compute (6 x active parameters x tokens; Kaplan et al. 2020).
   Every arm reads the data stream where the source stopped, starts at the source's learning rate at that
   step (``--lr`` to fix one) and decays it by a cosine, with a fresh AdamW, the same seed and batch order.
4. Report held-out validation loss at equal tokens ((b), (c) vs (a)) and at equal compute ((b), (c) vs (d))
   for every point, the wall time of each phase, ``results.json`` and plots. Whatever the outcome, it is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import moe_upcycle
from moe_upcycle.demo import DemoModelSpec, build_demo_checkpoint, write_text_splits

BLOCK, BATCH = 128, 16
WARMUP, CONSTANT = 30, 300  # the source's schedule: linear warm-up, constant until step CONSTANT, then 1/sqrt(step)


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


@dataclass(frozen=True)
class Setup:
    """What every training run shares: the data, the device and the numerics."""

    train: torch.Tensor
    valid: torch.Tensor
    device: str
    bf16: bool
    eval_every: int
    seed: int = 0

    def autocast(self):
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.bf16)


@torch.no_grad()
def validation_loss(model, setup: Setup) -> float:
    model.eval()
    with setup.autocast():
        losses = [model.model(input_ids=b, labels=b).loss.item() if hasattr(model, "moe_blocks")
                  else model(input_ids=b, labels=b).loss.item() for b in setup.valid.to(setup.device).split(32)]
    model.train()
    return sum(losses) / len(losses)


def active_parameters(model) -> int:
    total = sum(p.numel() for p in model.parameters())
    if not hasattr(model, "moe_blocks"):
        return total
    config = model.config
    experts = sum(p.numel() for b in model.moe_blocks() for p in b.experts.parameters())
    return total - experts * (config.num_experts - config.num_experts_per_tok) // config.num_experts


def source_lr(step: int, peak: float) -> float:
    """The source's learning rate after ``step`` optimizer steps: warm-up, constant, then 1/sqrt(step)."""
    return peak * min((step + 1) / WARMUP, 1.0, math.sqrt(CONSTANT / (step + 1)))


def continuation_lr(step: int, peak: float, steps: int) -> float:
    """Each arm's: a 20-step warm-up (its AdamW is fresh) to ``peak``, then a cosine to zero over ``steps``."""
    return peak * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))


def batch_order(n_blocks: int, first_step: int, steps: int, seed: int = 0) -> torch.Tensor:
    """Block indices [steps, BATCH] of steps ``first_step + 1 ...`` of one data stream shared by every run (a fresh
    permutation each epoch), so that a continuation reads the data the source would have read next."""
    generator, per_epoch = torch.Generator().manual_seed(seed + 1), n_blocks // BATCH
    epochs = math.ceil((first_step + steps) / per_epoch)
    stream = torch.cat([torch.randperm(n_blocks, generator=generator)[: per_epoch * BATCH] for _ in range(epochs)])
    return stream.view(-1, BATCH)[first_step : first_step + steps]


def train_arm(name: str, path: Path, setup: Setup, steps: int, lr, first_step: int = 0,
              save_at: dict[int, Path] | None = None) -> dict:
    """Train the checkpoint at ``path`` for ``steps`` steps at learning rate ``lr(step)``, evaluating every
    ``setup.eval_every`` steps (and where ``save_at`` saves a checkpoint). ``train_loss`` is the mean objective
    since the last evaluation: for the MoE arms, with the router's balancing loss."""
    torch.manual_seed(setup.seed)
    save_at = save_at or {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(setup.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.01, fused=setup.device != "cpu")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr)
    train, order = setup.train.to(setup.device), batch_order(setup.train.shape[0], first_step, steps, setup.seed).to(setup.device)
    active = active_parameters(model)
    curve = [{"step": 0, "tokens": 0, "flops": 0.0, "lr": lr(0), "train_loss": None, "val_loss": validation_loss(model, setup)}]
    running, start = torch.zeros((), device=setup.device), time.perf_counter()
    for step in range(1, steps + 1):
        batch = train[order[step - 1]]
        with setup.autocast():
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        running += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step in save_at:
            model.save_pretrained(save_at[step])
        if step % setup.eval_every == 0 or step == steps or step in save_at:
            tokens = step * BATCH * BLOCK
            curve.append({"step": step, "tokens": tokens, "flops": 6.0 * active * tokens, "lr": lr(step),
                          "train_loss": running.item() / (step - curve[-1]["step"]), "val_loss": validation_loss(model, setup)})
            running.zero_()
            print(f"  {name:<24} step {step:>6}  train {curve[-1]['train_loss']:.4f}  val {curve[-1]['val_loss']:.4f}  "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    return {"name": name, "active_params": active, "curve": curve, "seconds": time.perf_counter() - start}


def run_arm(job: dict) -> dict:
    return train_arm(**job)


@contextmanager
def phase(name: str, timings: dict):
    print(f"[{name}]", flush=True)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    print(f"[{name}: {timings[name]:.1f} s wall]", flush=True)


def prepare(args) -> tuple[Setup, PreTrainedTokenizerFast]:
    """Write the corpus, train the tokenizer, save the randomly initialised source and cut the text into blocks."""
    train_file, valid_file = write_corpus(args.out / "data", args.corpus)
    build_demo_checkpoint(args.out / "source" / "init", DemoModelSpec(train_steps=0, seed=args.seed),
                          text=train_file.read_text(), log=lambda *_: None)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.out / "source" / "init")
    return Setup(blocks_of(train_file.read_text(), tokenizer),
                 validation_blocks(valid_file.read_text(), tokenizer, args.valid_blocks),
                 args.device, args.bf16, args.eval_every, args.seed), tokenizer


def continuation_jobs(args, points: list[int], checkpoints: dict[int, Path], setup: Setup, ratio: float) -> list[dict]:
    """The four arms from each checkpoint, as ``train_arm`` keyword arguments: dense, upcycled, Drop-Upcycling
    at ``args.steps`` steps, then dense for ``ratio`` times as many (equal compute)."""
    jobs = []
    for p in points:
        peak = args.lr or source_lr(p, DemoModelSpec.learning_rate)
        for name, path, steps in (("dense", checkpoints[p], args.steps), ("upcycled", args.out / f"moe-{p}", args.steps),
                                  ("drop-upcycled", args.out / f"drop-{p}", args.steps),
                                  ("dense, = compute", checkpoints[p], math.ceil(args.steps * ratio))):
            jobs.append({"name": f"{name} @{p}", "path": path, "setup": setup, "steps": steps, "first_step": p,
                         "lr": partial(continuation_lr, peak=peak, steps=steps)})
    return jobs


def run_arms(jobs: list[dict], workers: int) -> list[dict]:
    """``train_arm`` for every job, in ``workers`` processes at a time (each its own CUDA context)."""
    if workers == 1:
        return [train_arm(**job) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(max(1, (os.cpu_count() or 1) // workers),)) as pool:
        return list(pool.map(run_arm, jobs))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    points, out, timings = sorted(set(args.pretrain_steps)), args.out, {}
    print(f"device {args.device}, {'bfloat16 autocast' if args.bf16 else 'float32'}, TF32 matmuls {'on' if args.tf32 else 'off'}")
    with phase("corpus and tokenizer", timings):
        setup, tokenizer = prepare(args)
    print(f"corpus {args.corpus}: {setup.train.numel() / 1e6:.2f}M training tokens "
          f"({setup.train.shape[0] // BATCH} steps of {BATCH} x {BLOCK} per epoch); {args.valid_blocks} validation blocks")
    checkpoints = {p: out / "source" / f"step-{p}" for p in points}
    with phase(f"source pre-training, {points[-1]} steps", timings):
        source = train_arm("source", out / "source" / "init", setup, points[-1],
                           partial(source_lr, peak=DemoModelSpec.learning_rate), save_at=checkpoints)
    with phase("upcycling", timings):
        for p, dense in checkpoints.items():
            tokenizer.save_pretrained(dense)
            for folder, ratio in ((out / f"moe-{p}", 0.0), (out / f"drop-{p}", 0.5)):
                moe_upcycle.upcycle(dense, folder, num_experts=8, top_k=2, drop_upcycling_ratio=ratio, seed=args.seed,
                                    overwrite=True)
        moe = AutoModelForCausalLM.from_pretrained(out / f"moe-{points[0]}")
    jobs = continuation_jobs(args, points, checkpoints, setup, active_parameters(moe) / source["active_params"])
    workers = args.workers or (min(len(jobs), os.cpu_count() or 1) if args.device != "cpu" else 1)
    print(f"{len(jobs)} arms, {workers} at a time; each starts at the source's learning rate at its checkpoint"
          if args.lr is None else f"{len(jobs)} arms, {workers} at a time, peak learning rate {args.lr}")
    with phase("continuation arms", timings):
        arms = run_arms(jobs, workers)
    sweep = [{"pretrain_steps": p, "lr": jobs[4 * i]["lr"].keywords["peak"], "arms": arms[4 * i : 4 * i + 4]}
             for i, p in enumerate(points)]
    report(source, sweep, timings)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (out / "results.json").write_text(json.dumps({"settings": settings, "source": source, "sweep": sweep,
                                                  "phase_seconds": timings}, indent=1) + "\n")
    for point in sweep:
        plot(point["arms"], out / f"curves-{point['pretrain_steps']}.png",
             f"{args.corpus}, source pre-trained for {point['pretrain_steps']} steps")
    for path in [out / "upcycling_sweep.png"] + ([args.figure] if args.figure else []):
        plot_sweep(source, sweep, path, args.corpus)
    print(f"plots: {out / 'upcycling_sweep.png'}, {out}/curves-*.png{', ' + str(args.figure) if args.figure else ''}; "
          f"raw curves: {out / 'results.json'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=["docs", "docs+stdlib"], default="docs+stdlib")
    parser.add_argument("--pretrain-steps", type=int, nargs="+", default=[300, 1000, 3000, 6000],
                        help="sweep points: the source is trained once, to the largest, with a checkpoint at each")
    parser.add_argument("--steps", type=int, default=600, help="continuation steps per arm (dense at equal compute: more)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--valid-blocks", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="the source's initialisation, the data order, the routers")
    parser.add_argument("--lr", type=float, default=None, help="continuation peak lr (default: the source's at the checkpoint)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (default: float32 throughout)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (default: off)")
    parser.add_argument("--workers", type=int, default=None, help="arms trained at once (default: CPU cores on a GPU, 1 on CPU)")
    parser.add_argument("--out", type=Path, default=Path("upcycling_experiment"))
    parser.add_argument("--figure", type=Path, default=None, help="also save the sweep plot here")
    return parser.parse_args(argv)


def final(arm: dict) -> float:
    return arm["curve"][-1]["val_loss"]


def report(source: dict, sweep: list[dict], timings: dict) -> None:
    """The source's curve at the sweep points, then one row per point: final losses and the two gaps per MoE arm."""
    at = {c["step"]: c for c in source["curve"]}
    print(f"\nsource: dense Llama, {source['active_params']:,} parameters")
    print(f"{'step':>7}{'lr':>10}{'train loss':>12}{'val loss':>10}")
    for point in sweep:
        c = at[point["pretrain_steps"]]
        print(f"{c['step']:>7}{c['lr']:>10.2e}{c['train_loss']:>12.4f}{c['val_loss']:>10.4f}")
    dense, moe, drop, dense_c = sweep[0]["arms"]
    print(f"\ncontinuation: {dense['curve'][-1]['step']} steps ({dense['curve'][-1]['tokens'] / 1e6:.2f}M tokens, "
          f"{dense['active_params']:,} active params dense, {moe['active_params']:,} MoE); dense at equal compute "
          f"{dense_c['curve'][-1]['step']} steps. Final validation loss, and the MoE arms' gaps (negative: MoE ahead):")
    print(f"{'pretrain':>8}{'source':>8}{'dense':>8}{'upcyc.':>8}{'drop':>8}{'dense=C':>8} |"
          f"{'upc =tok':>9}{'upc =C':>8}{'drop =tok':>10}{'drop =C':>8}")
    for point in sweep:
        dense, moe, drop, dense_c = point["arms"]
        losses = "".join(f"{final(a):>8.4f}" for a in point["arms"])
        print(f"{point['pretrain_steps']:>8}{dense['curve'][0]['val_loss']:>8.4f}{losses} |"
              f"{final(moe) - final(dense):>+9.4f}{final(moe) - final(dense_c):>+8.4f}"
              f"{final(drop) - final(dense):>+10.4f}{final(drop) - final(dense_c):>+8.4f}")
    for i, name in ((1, "upcycled"), (2, "drop-upcycled")):
        ahead = [p["pretrain_steps"] for p in sweep if final(p["arms"][i]) < final(p["arms"][3])]
        print(f"{name}: ahead of dense at equal compute at pretrain steps {ahead}" if ahead else
              f"{name}: behind dense at equal compute at every sweep point")
    print("(one run per arm, one seed: the seed-to-seed spread is not measured here; --seed gives another run)")
    print("wall time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
          + f"; total {sum(timings.values()):.0f} s")


def plot(arms: list[dict], path: Path, title: str) -> None:
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
    fig.suptitle(f"Continuing dense vs sparse upcycling ({title})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(source: dict, sweep: list[dict], path: Path, corpus: str) -> None:
    """Left: the source's loss curve. Middle: each arm's final validation loss per sweep point. Right: the gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    curve, points = source["curve"][1:], [p["pretrain_steps"] for p in sweep]
    axes[0].plot([c["step"] for c in curve], [c["train_loss"] for c in curve], label="training loss")
    axes[0].plot([c["step"] for c in curve], [c["val_loss"] for c in curve], label="validation loss")
    for p in points:
        axes[0].axvline(p, color="grey", lw=0.6, ls=":")
    axes[0].set_title("dense source (dotted: sweep points)", fontsize=9)
    for i in range(4):
        axes[1].plot(points, [final(p["arms"][i]) for p in sweep], marker="o", label=sweep[0]["arms"][i]["name"].split(" @")[0])
    axes[1].set_title("final validation loss after continuing", fontsize=9)
    for i, name in ((1, "upcycled"), (2, "drop-upcycled")):
        for j, (other, style) in enumerate(((0, "--"), (3, "-"))):
            axes[2].plot(points, [final(p["arms"][i]) - final(p["arms"][other]) for p in sweep], ls=style, marker="o",
                         color=f"C{i}", label=f"{name} vs dense, equal {('tokens', 'compute')[j]}")
    axes[2].axhline(0, color="black", lw=0.8)
    axes[2].set_title("MoE minus dense (below 0: upcycling ahead)", fontsize=9)
    ylabels = ("loss (nats/token)", "validation loss (nats/token)", "validation loss gap (nats/token)")
    for ax, ylabel in zip(axes, ylabels, strict=True):
        ax.set_xscale("log")
        ax.set_xticks(points, [str(p) for p in points])
        ax.minorticks_off()
        ax.set_xlabel("dense pre-training steps", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Sparse upcycling vs continuing dense, by how long the source was trained ({corpus})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
