"""Whole training step: the dense source, our upcycled model with each experts kernel, stock Mixtral, the ideal.

    python scripts/bench_train_step.py [--shapes 0.5b 1b] [--rounds 3] [--warmup 1] [--steps 2] [--threads 2]
                                       [--arms ...] [--quick]

A dense Llama with a real model's layer shapes (``0.5b``: hidden 896, intermediate 4864, 14 heads / 2 KV heads,
2 layers, 8 experts top-2; ``1b``: hidden 2048, intermediate 5632, 32 / 4 heads, 4 layers, 16 experts top-2;
vocabulary 512) is built with random init in a temporary folder, upcycled with ``moe_upcycle.upcycle`` and
exported to ``MixtralForCausalLM`` (the same weights, ``moe_upcycle.export``). One step is what training does:
``zero_grad(set_to_none=True)``, forward with labels (the load-balancing loss on: Mixtral with
``output_router_logits=True``), backward, ``AdamW(fused=True).step()`` (the Trainer's default optimizer,
``adamw_torch_fused``), on 2 x 512 tokens in float32.

Arms: ``dense`` (the source); ``ideal``: a dense model whose MLPs are k x I wide (the matmul FLOPs of the top-k
experts) that also updates (E - k) x the MLP parameters per layer with AdamW (zero-filled fresh gradients), so it
has the MoE's parameter count and FLOPs and no routing: what a perfect experts kernel would cost, measured;
``ours <kernel>`` (``upcycled_default``, ``sorted_mm``, ``grouped_mm``, ``eager``: one model, its kernel switched);
``mixtral <kernel>`` (``grouped_mm``, ``eager``).

Memory is recycled as in training: every arm lives in one process and runs ``--warmup`` untimed then ``--steps``
timed steps per round, arms interleaved (their order rotated each round); figures are medians over rounds. Each
round runs in two fresh processes, one of them with ``torch.set_flush_denormal(True)`` set before any parallel work
(the flag is per thread: set later, it misses the OpenMP workers), to detect a denormal-number trap. Exit status 1
if ours (``upcycled_default``) is slower than the fastest stock Mixtral kernel or differs by more than 10% from its
flush-to-zero run (not enforced with ``--quick``, a small-shape smoke test). ``cpu s`` is the process CPU time per
step (all threads): on a shared machine it moves less than wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

KERNELS_OURS = ("upcycled_default", "sorted_mm", "grouped_mm", "eager")
KERNELS_MIXTRAL = ("grouped_mm", "eager")
ARMS = ("dense", "ideal", *(f"ours {k}" for k in KERNELS_OURS), *(f"mixtral {k}" for k in KERNELS_MIXTRAL))
VOCAB = 512


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    batch: int = 2
    seq: int = 512

    def describe(self) -> str:
        return (f"hidden {self.hidden}, intermediate {self.intermediate}, {self.heads}/{self.kv_heads} heads, "
                f"{self.layers} layers, {self.experts} experts top-{self.top_k}, batch {self.batch} x {self.seq}")


SHAPES = {
    "0.5b": Shapes(hidden=896, intermediate=4864, layers=2, heads=14, kv_heads=2, experts=8, top_k=2),
    "1b": Shapes(hidden=2048, intermediate=5632, layers=4, heads=32, kv_heads=4, experts=16, top_k=2),
    "quick": Shapes(hidden=128, intermediate=352, layers=2, heads=4, kv_heads=2, experts=8, top_k=2, seq=64),
}


# -- checkpoints and memory (parent process) ----------------------------------------------------------------------
def dense_config(shapes: Shapes, intermediate: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shapes.hidden, intermediate_size=intermediate or shapes.intermediate,
                       num_hidden_layers=shapes.layers, num_attention_heads=shapes.heads,
                       num_key_value_heads=shapes.kv_heads, vocab_size=VOCAB, max_position_embeddings=shapes.seq)


def parameter_counts(shapes: Shapes) -> dict[str, int]:
    """Parameters of each model: dense, ideal (k x I MLPs + (E - k) x MLP padding), MoE (ours and Mixtral)."""
    mlp = 3 * shapes.hidden * shapes.intermediate
    dense = 2 * VOCAB * shapes.hidden + shapes.hidden + shapes.layers * (
        2 * shapes.hidden + mlp + 2 * shapes.hidden * shapes.hidden
        + 2 * shapes.hidden * shapes.hidden * shapes.kv_heads // shapes.heads)
    moe = dense + shapes.layers * ((shapes.experts - 1) * mlp + shapes.experts * shapes.hidden)
    return {"dense": dense, "ideal": dense + shapes.layers * (shapes.experts - 1) * mlp, "moe": moe}


def bytes_needed(shapes: Shapes, arms: list[str]) -> int:
    """float32 weights + AdamW moments of every model held by one process, plus one model's gradients."""
    counts = parameter_counts(shapes)
    held = [counts["dense"]] * ("dense" in arms) + [counts["ideal"]] * ("ideal" in arms) + [
        counts["moe"]] * any(a.startswith("ours") for a in arms) + [counts["moe"]] * any(a.startswith("mixtral") for a in arms)
    return 4 * (3 * sum(held) + max(held))


def memory_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def build_checkpoints(shapes: Shapes, folder: Path) -> None:
    """dense/ (random-init Llama), moe/ (upcycled), mixtral/ (exported): the same weights in three classes."""
    import torch
    from transformers import LlamaForCausalLM

    import moe_upcycle
    from moe_upcycle.export import export_native

    torch.manual_seed(0)
    LlamaForCausalLM(dense_config(shapes)).save_pretrained(folder / "dense")
    moe_upcycle.upcycle(folder / "dense", folder / "moe", num_experts=shapes.experts, top_k=shapes.top_k)
    export_native(folder / "moe", folder / "mixtral", to="mixtral")


# -- one measuring process (child) -------------------------------------------------------------------------------
@dataclass
class Arm:
    name: str
    model: object
    optimizer: object
    kernel: str | None = None  # experts kernel set before the arm's steps
    padding: tuple = ()  # ideal: parameters updated by AdamW only, with fresh zero gradients


def load_arms(folder: Path, shapes: Shapes, names: list[str]) -> list[Arm]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import moe_upcycle  # noqa: F401  (registers the upcycled model class)

    def adamw(model, extra=()):
        return torch.optim.AdamW([*model.parameters(), *extra], lr=1e-5, fused=True)

    arms = []
    if "dense" in names:
        model = AutoModelForCausalLM.from_pretrained(folder / "dense", dtype=torch.float32)
        arms.append(Arm("dense", model, adamw(model)))
    if "ideal" in names:
        torch.manual_seed(0)
        model = LlamaForCausalLM(dense_config(shapes, shapes.top_k * shapes.intermediate))
        H, I, pad = shapes.hidden, shapes.intermediate, shapes.experts - shapes.top_k
        padding = tuple(torch.nn.Parameter(torch.empty(pad, shape[0], shape[1]).normal_(std=0.02))
                        for _ in range(shapes.layers) for shape in ((2 * I, H), (H, I)))  # [E-k, 2I, H], [E-k, H, I]
        arms.append(Arm("ideal", model, adamw(model, padding), padding=padding))
    for family, subfolder, kernels in (("ours", "moe", KERNELS_OURS), ("mixtral", "mixtral", KERNELS_MIXTRAL)):
        wanted = [k for k in kernels if f"{family} {k}" in names]
        if not wanted:
            continue
        model = AutoModelForCausalLM.from_pretrained(folder / subfolder, dtype=torch.float32, experts_implementation=wanted[0])
        if family == "mixtral":
            model.config.output_router_logits = True  # Mixtral adds the balancing loss only then
        optimizer = adamw(model)
        arms += [Arm(f"{family} {k}", model, optimizer, kernel=k) for k in wanted]
    return arms


def train_step(arm: Arm, ids) -> None:
    import torch

    arm.optimizer.zero_grad(set_to_none=True)
    loss = arm.model(input_ids=ids, labels=ids).loss
    loss.backward()
    for p in arm.padding:
        p.grad = torch.zeros_like(p)
    arm.optimizer.step()


def measure(args: argparse.Namespace) -> None:
    """Child process: every arm, interleaved, ``--warmup`` + ``--steps`` steps each; prints JSON {arm: [[wall, cpu]]}."""
    import torch

    if args.child == "ftz":
        torch.set_flush_denormal(True)  # before any parallel region: the OpenMP workers inherit the flag
    torch.set_num_threads(args.threads)
    shapes = SHAPES[args.shapes[0]]
    arms = load_arms(Path(args.workdir), shapes, args.arms)
    for arm in arms:
        arm.model.train()
    ids = torch.randint(0, VOCAB, (shapes.batch, shapes.seq), generator=torch.Generator().manual_seed(0))
    shift = args.round % len(arms)
    times: dict[str, list[list[float]]] = {}
    for arm in arms[shift:] + arms[:shift]:
        if arm.kernel is not None:
            arm.model.set_experts_implementation(arm.kernel)
        for step in range(args.warmup + args.steps):
            wall, cpu = time.perf_counter(), time.process_time()
            train_step(arm, ids)
            if step >= args.warmup:
                times.setdefault(arm.name, []).append([time.perf_counter() - wall, time.process_time() - cpu])
    print(json.dumps(times))


# -- driver (parent) -----------------------------------------------------------------------------------------------
def run_child(args: argparse.Namespace, shape: str, workdir: Path, mode: str, round_index: int) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--workdir", str(workdir), "--shapes", shape,
               "--round", str(round_index), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--threads", str(args.threads), "--arms", *args.arms]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"measuring process failed ({mode}, round {round_index}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(shape: str, medians: dict[tuple[str, str], tuple[float, float]], args: argparse.Namespace) -> bool:
    """Print the table and the ratios; True if the checks pass."""
    shapes = SHAPES[shape]
    print(f"\n{shape}: {shapes.describe()}, float32, {args.threads} threads, {args.rounds} rounds x {args.steps} steps "
          f"(+{args.warmup} warm-up)")
    print("| arm | step s | cpu s | flush-to-zero step s | default / ftz | / ideal |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    ideal = medians.get(("ideal", "default"), (float("nan"),))[0]
    for name in args.arms:
        (wall, cpu), (ftz, _) = medians[(name, "default")], medians[(name, "ftz")]
        print(f"| {name} | {wall:#.3g} | {cpu:#.3g} | {ftz:#.3g} | {wall / ftz:.2f} | {wall / ideal:.2f} |")
    checks = {}
    ours = medians.get(("ours upcycled_default", "default"))
    natives = {n: medians[(n, "default")][0] for n in args.arms if n.startswith("mixtral")}
    if ours is not None and natives:
        native = min(natives, key=natives.get)
        ratio = ours[0] / natives[native]
        checks[f"ours (upcycled_default) / native ({native}, the fastest stock kernel) = {ratio:.3f} <= 1"] = ratio <= 1.0
    if ours is not None:
        ftz_ratio = ours[0] / medians[("ours upcycled_default", "ftz")][0]
        checks[f"ours default / flush-to-zero = {ftz_ratio:.3f}, within 10%"] = abs(ftz_ratio - 1) <= 0.10
        print(f"ours / ideal: {ours[0] / ideal:.2f}")
    for check, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}: {check}")
    return all(checks.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None,
                        help="shape sets (default: 0.5b 1b, each if memory allows; quick with --quick)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per arm per round")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per arm per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--quick", action="store_true", help="small shapes, checks not enforced: a smoke test")
    parser.add_argument("--child", choices=["default", "ftz"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args)
        return
    args.shapes = args.shapes or (["quick"] if args.quick else ["0.5b", "1b"])
    ok = True
    for shape in args.shapes:
        needed, available = bytes_needed(SHAPES[shape], args.arms), memory_available()
        if needed > 0.8 * available:
            print(f"\n{shape}: skipped, needs ~{needed / 1e9:.1f} GB (weights, AdamW moments, one model's gradients), "
                  f"{available / 1e9:.1f} GB available; choose fewer --arms or a larger machine")
            continue
        with tempfile.TemporaryDirectory(prefix=f"bench_train_step_{shape}_") as tmp:
            build_checkpoints(SHAPES[shape], Path(tmp))
            samples: dict[tuple[str, str], list[list[float]]] = {}
            for round_index in range(args.rounds):
                for mode in ("default", "ftz") if round_index % 2 == 0 else ("ftz", "default"):
                    for name, steps in run_child(args, shape, Path(tmp), mode, round_index).items():
                        samples.setdefault((name, mode), []).extend(steps)
                print(f"  round {round_index + 1}/{args.rounds} done", flush=True)
        medians = {key: tuple(statistics.median(s[i] for s in steps) for i in (0, 1)) for key, steps in samples.items()}
        ok &= report(shape, medians, args)
    if not args.quick and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
