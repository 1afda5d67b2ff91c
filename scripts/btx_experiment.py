"""Branch-Train-MiX (Sukhbaatar et al. 2024, arXiv 2403.07816) at small scale, on three real text domains: what
mixing domain experts into one MoE buys over a dense model trained as long and over the classic ensemble.

    python scripts/btx_experiment.py --seed-steps 600 --branch-steps 200 --moe-steps 100 --threads 1 \\
        --out /tmp/btx_experiment --figure scripts/figures/btx_experiment.png \\
        --routing-figure scripts/figures/btx_routing.png

These are the defaults but ``--threads 1`` (one torch thread: three times faster than two on a CPU that other
processes share): 11.7 minutes on 2 CPU cores that other processes were using too. A quick check:
``--seed-steps 60 --branch-steps 20 --moe-steps 10`` (2 minutes).

1. Corpus: English documentation prose (``pydoc_data.topics``, one document per topic), Python source (the standard
   library's top-level modules) and C source (the headers under /usr/include), one document per file (code files cut
   to ``--doc-chars``). Documents are shuffled; every 10th is held out. Each domain gets at most ``--train-chars`` of
   training and ``--valid-chars`` of held-out text. The mixed training text is their concatenation; the loss on
   the mix is that on the three held-out texts together (their token-weighted mean).
2. Seed: the demo-sized dense Llama and its byte-level BPE tokenizer (``moe_upcycle.demo``), both trained on the
   mixed training text (``--seed-steps`` steps, warm-up then cosine).
3. Branch: one copy of the seed per domain, trained on that domain alone (``moe-upcycle train``, full fine-tuning).
4. MiX: ``moe_upcycle.mix`` with each branch's MLPs as one expert, every other tensor the float32 mean of the branches
   (``nonexpert: average``), ``--gate-mode`` router rows (``hidden``: 16 snippets of the domain's training text as
   positive prompts, the other domains' as negative ones) and top-``--top-k``; then fine-tune the whole MoE (router
   and all, with the default load-balancing loss) on mixed data for ``--moe-steps`` steps.
5. Compare on each domain's held-out text and on the mix: (a) the seed trained further on mixed data for the same
   training compute as branches + MoE fine-tuning (6 x active parameters x tokens; Kaplan et al. 2020); (b) the
   ensemble of the branches (mean of their next-token probabilities; 3 dense forwards per token); (c) the fine-tuned
   BTX MoE; (d) the same MoE right after mixing. ``moe_upcycle.analysis.analyze`` shows where each domain's tokens
   go in (c) and (d). Every continuation uses the same recipe: AdamW, ``--lr`` with a 10% warm-up then a cosine,
   batches of 16 x 128 tokens, one seed (its end-of-run evaluation reads only 16 held-out blocks: the comparison
   evaluates every arm itself, on the same blocks). Whatever the outcome, it is printed and written to
   ``results.json``, ``btx_experiment.png`` and ``routing-btx/`` (``analyze``'s JSON and heatmap).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sysconfig
from pathlib import Path

import torch
from compare_upcycling import active_parameters, phase
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_outputs import CausalLMOutput

import moe_upcycle
from moe_upcycle.analysis import analyze
from moe_upcycle.demo import DemoModelSpec, build_demo_checkpoint
from moe_upcycle.evaluation import evaluate_perplexity
from moe_upcycle.train import run_training
from moe_upcycle.train.args import DataArguments
from moe_upcycle.train.data import load_files, pack

DOMAINS = ("prose", "python", "c")
HEADERS = Path("/usr/include")
ARMS = {  # key -> table label
    "seed": "seed (before branching)",
    "branch-prose": "branch: prose only",
    "branch-python": "branch: python only",
    "branch-c": "branch: c only",
    "dense": "(a) dense, = compute",
    "ensemble": "(b) ensemble of branches",
    "btx": "(c) BTX MoE, fine-tuned",
    "btx-mixed": "(d) BTX MoE, before FT",
}


def domain_documents(name: str, doc_chars: int) -> list[str]:
    """The domain's documents: documentation topics, or source files cut to ``doc_chars`` characters."""
    if name == "prose":
        from pydoc_data.topics import topics

        return [topics[key].strip() for key in sorted(topics) if topics[key].strip()]
    files = (sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")) if name == "python"
             else sorted(HEADERS.rglob("*.h")))
    texts = (f.read_text(errors="replace")[:doc_chars].strip() for f in files if f.is_file())
    return [t for t in texts if t]


def write_corpus(folder: Path, train_chars: int, valid_chars: int, doc_chars: int, seed: int) -> dict:
    """``{domain}.train.txt`` / ``{domain}.valid.txt`` for each domain and ``mix.*``; returns the characters written."""
    if not any(HEADERS.rglob("*.h")):
        raise SystemExit(f"no C headers under {HEADERS}: this experiment needs them as its C domain")
    folder.mkdir(parents=True, exist_ok=True)
    sizes, mixed = {}, {"train": [], "valid": []}
    for name in DOMAINS:
        documents = domain_documents(name, doc_chars)
        random.Random(seed).shuffle(documents)
        parts = {"train": [], "valid": []}
        for i, doc in enumerate(documents):
            split, limit = ("valid", valid_chars) if i % 10 == 9 else ("train", train_chars)
            if sum(map(len, parts[split])) < limit:
                parts[split].append(doc[: limit - sum(map(len, parts[split]))])
        for split, docs in parts.items():
            (folder / f"{name}.{split}.txt").write_text("\n\n".join(docs))
            mixed[split].append("\n\n".join(docs))
        sizes[name] = {split: sum(map(len, docs)) for split, docs in parts.items()}
    for split, texts in mixed.items():
        (folder / f"mix.{split}.txt").write_text("\n\n".join(texts))
    return sizes


def train(model: Path, data: Path, train_set: str, valid_set: str, output: Path, steps: int, args, spec) -> dict:
    """``moe-upcycle train`` (full fine-tuning): ``steps`` steps of ``spec.batch_size`` x ``spec.block_size`` tokens."""
    return run_training([
        "--model_name_or_path", str(model), "--train_file", str(data / f"{train_set}.train.txt"),
        "--validation_file", str(data / f"{valid_set}.valid.txt"), "--output_dir", str(output),
        "--block_size", str(spec.block_size), "--per_device_train_batch_size", str(spec.batch_size),
        "--max_steps", str(steps), "--learning_rate", str(args.lr), "--lr_scheduler_type", "cosine",
        "--warmup_steps", "0.1", "--weight_decay", "0.01", "--logging_steps", str(max(1, steps // 4)),
        "--max_eval_samples", "16", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", str(args.seed),
    ])


class ProbabilityAverage(torch.nn.Module):
    """The classic ensemble: the mean of the members' next-token distributions; ``logits`` holds its log."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> CausalLMOutput:
        log_probs = torch.stack([m(input_ids=input_ids).logits.float().log_softmax(-1) for m in self.members])  # [M, B, S, V]
        return CausalLMOutput(logits=torch.logsumexp(log_probs, dim=0) - math.log(len(self.members)))  # [B, S, V]


def held_out_blocks(data: Path, tokenizer, block_size: int) -> dict:
    """Each domain's held-out text packed as ``evaluate_file`` and ``analyze`` pack it."""
    sets = {}
    for name in DOMAINS:
        file = str(data / f"{name}.valid.txt")
        sets[name] = pack(load_files({"validation": file}), tokenizer,
                          DataArguments(validation_file=file, block_size=block_size))["validation"]
    return sets


def losses(model: torch.nn.Module, blocks: dict) -> dict[str, float]:
    """Held-out loss per domain and on the mix (the three held-out texts together: a token-weighted mean)."""
    results = {name: evaluate_perplexity(model, packed) for name, packed in blocks.items()}
    tokens = sum(r["tokens"] for r in results.values())
    return {**{name: r["eval_loss"] for name, r in results.items()},
            "mix": sum(r["eval_loss"] * r["tokens"] for r in results.values()) / tokens}


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def routing(model: Path, data: Path, output: Path, block_size: int) -> dict:
    """``analyze`` over the three held-out texts: per-layer shares, and each domain's share on its own expert."""
    report = analyze(model, {name: data / f"{name}.valid.txt" for name in DOMAINS}, output, block_size=block_size,
                     overwrite=True)
    for layer in report.moe_layers:
        print(report.table(layer))
    shares = report.shares  # [L, D, E]; expert i is domain i's branch
    own = [[shares[layer, d, d].item() for d in range(len(DOMAINS))] for layer in range(shares.shape[0])]
    return {"layers": report.moe_layers, "top_k": report.top_k, "share": shares.tolist(), "own_expert_share": own,
            "loss": dict(zip(DOMAINS, report.loss, strict=True)), "heatmap": str(output / "routing.png")}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out, timings, spec = args.out, {}, DemoModelSpec(train_steps=args.seed_steps, seed=args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = out / "data"
    with phase("corpus, tokenizer and seed model", timings):
        sizes = write_corpus(data, args.train_chars, args.valid_chars, args.doc_chars, args.seed)
        build_demo_checkpoint(out / "seed", spec, text=(data / "mix.train.txt").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out / "seed")
    for name, size in sizes.items():
        size["train_tokens"] = len(tokenizer((data / f"{name}.train.txt").read_text())["input_ids"])
    print("corpus: " + "; ".join(f"{d} {s['train']:,} / {s['valid']:,} chars train / held out ({s['train_tokens']:,} "
                                 f"training tokens)" for d, s in sizes.items()))
    branches = {name: out / f"branch-{name}" for name in DOMAINS}
    with phase(f"branches: {args.branch_steps} steps on each domain", timings):
        for name, folder in branches.items():
            train(out / "seed", data, name, name, folder, args.branch_steps, args, spec)
    with phase("mix", timings):
        snippets = {name: prompts(data / f"{name}.train.txt") for name in DOMAINS}
        recipe = {"gate_mode": args.gate_mode, "experts_per_token": args.top_k, "nonexpert": "average", "seed": args.seed,
                  "experts": [{"source_model": str(branches[name]), **({
                      "positive_prompts": snippets[name],
                      "negative_prompts": [p for other in DOMAINS if other != name for p in snippets[other]],
                  } if args.gate_mode == "hidden" else {})} for name in DOMAINS]}
        (out / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
        moe_upcycle.mix(recipe, out / "btx-mixed", overwrite=True)
    with phase(f"BTX fine-tuning: {args.moe_steps} steps on the mix", timings):
        train(out / "btx-mixed", data, "mix", "mix", out / "btx", args.moe_steps, args, spec)
    params = {"dense": active_parameters(load(out / "seed")), "moe": active_parameters(load(out / "btx"))}
    dense_steps = math.ceil((len(DOMAINS) * args.branch_steps * params["dense"] + args.moe_steps * params["moe"])
                            / params["dense"])
    with phase(f"dense at equal compute: {dense_steps} steps on the mix", timings):
        train(out / "seed", data, "mix", "mix", out / "dense", dense_steps, args, spec)
    with phase("held-out evaluation", timings):
        blocks = held_out_blocks(data, tokenizer, spec.block_size)
        results = {key: losses(load(out / key), blocks) for key in ARMS if key != "ensemble"}
        results["ensemble"] = losses(ProbabilityAverage([load(f) for f in branches.values()]), blocks)
    with phase("routing (analyze)", timings):
        routes = {key: routing(out / key, data, out / f"routing-{key}", spec.block_size) for key in ("btx", "btx-mixed")}
    tokens = spec.batch_size * spec.block_size
    cost = costs(params, tokens, args, dense_steps)
    table = [{"arm": key, "label": ARMS[key], "loss": results[key], **cost[key]} for key in ARMS]
    report(table, sizes, params, routes, timings, args, dense_steps, tokens)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (out / "results.json").write_text(json.dumps({
        "settings": settings, "corpus_chars": sizes, "active_params": params, "tokens_per_step": tokens,
        "seed_training_flops": 6.0 * params["dense"] * tokens * args.seed_steps, "dense_steps": dense_steps,
        "arms": table, "routing": routes, "phase_seconds": timings}, indent=1) + "\n")
    plot(table, out / "btx_experiment.png")
    if args.figure:
        shutil.copy(out / "btx_experiment.png", args.figure)
    if args.routing_figure:
        shutil.copy(routes["btx"]["heatmap"], args.routing_figure)
    print(f"results: {out / 'results.json'}; figure {out / 'btx_experiment.png'}; routing {routes['btx']['heatmap']}")


def prompts(train_file: Path, count: int = 16, chars: int = 400) -> list[str]:
    """``count`` snippets spread evenly over a domain's training text: its router row's ``positive_prompts``."""
    paragraphs = [p.strip()[:chars] for p in train_file.read_text().split("\n\n") if len(p.strip()) >= 40]
    return [paragraphs[i] for i in torch.linspace(0, len(paragraphs) - 1, min(count, len(paragraphs))).long().tolist()]


def costs(params: dict, tokens: int, args, dense_steps: int) -> dict[str, dict]:
    """Training FLOPs after the seed (6 x active params x tokens) and forward FLOPs per token (2 x active params)."""
    branch = 6.0 * params["dense"] * tokens * args.branch_steps
    moe_tuning = 6.0 * params["moe"] * tokens * args.moe_steps
    dense, moe = 2.0 * params["dense"], 2.0 * params["moe"]
    return {"seed": {"train_flops": 0.0, "inference_flops": dense},
            **{f"branch-{d}": {"train_flops": branch, "inference_flops": dense} for d in DOMAINS},
            "dense": {"train_flops": 6.0 * params["dense"] * tokens * dense_steps, "inference_flops": dense},
            "ensemble": {"train_flops": len(DOMAINS) * branch, "inference_flops": len(DOMAINS) * dense},
            "btx": {"train_flops": len(DOMAINS) * branch + moe_tuning, "inference_flops": moe},
            "btx-mixed": {"train_flops": len(DOMAINS) * branch, "inference_flops": moe}}


def report(table, sizes, params, routes, timings, args, dense_steps, tokens) -> None:
    print(f"\ndense Llama {params['dense']:,} parameters; BTX MoE top-{args.top_k} of {len(DOMAINS)} experts, "
          f"{params['moe']:,} active; {tokens} tokens a step. Branches {args.branch_steps} steps each, MoE fine-tuning "
          f"{args.moe_steps} steps, dense at equal compute {dense_steps} steps. Held-out loss (nats/token):")
    sets = (*DOMAINS, "mix")
    print(f"{'arm':<26}" + "".join(f"{s:>8}" for s in sets) + f"{'train TFLOPs':>14}{'infer MFLOPs/tok':>18}")
    for row in table:
        print(f"{row['label']:<26}" + "".join(f"{row['loss'][s]:>8.4f}" for s in sets)
              + f"{row['train_flops'] / 1e12:>14.2f}{row['inference_flops'] / 1e6:>18.2f}")
    by = {row["arm"]: row["loss"] for row in table}
    for other in ("dense", "ensemble", "btx-mixed"):
        print(f"(c) minus {ARMS[other]:<24}" + "".join(f"{by['btx'][s] - by[other][s]:>+8.4f}" for s in sets))
    print("(negative: the fine-tuned BTX MoE is ahead; one run, one seed: the seed-to-seed spread is not measured)")
    for key, route in routes.items():
        own = ", ".join(f"layer {layer}: " + " ".join(f"{d} {s:.2f}" for d, s in zip(DOMAINS, shares, strict=True))
                        for layer, shares in zip(route["layers"], route["own_expert_share"], strict=True))
        print(f"share of each domain's tokens on its own branch's expert in {ARMS[key]} (uniform "
              f"{route['top_k'] / len(DOMAINS):.2f}): {own}")
    print("wall time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
          + f"; total {sum(timings.values()):.0f} s")


def plot(table: list[dict], path: Path) -> None:
    """Left: held-out loss per evaluation set and arm. Right: loss on the mix against inference cost per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.6), dpi=110, gridspec_kw={"width_ratios": [2, 1]})
    sets, width = (*DOMAINS, "mix"), 0.8 / len(table)
    for i, row in enumerate(table):
        xs = [j + (i - (len(table) - 1) / 2) * width for j in range(len(sets))]
        axes[0].bar(xs, [row["loss"][s] for s in sets], width, label=row["label"], color=f"C{i}")
    axes[0].set_xticks(range(len(sets)), [f"held-out {s}" for s in sets])
    low = min(row["loss"][s] for row in table for s in sets)
    axes[0].set_ylim(low - 0.3, max(row["loss"][s] for row in table for s in sets) + 0.1)
    axes[0].set_ylabel("held-out loss (nats/token)")
    axes[0].legend(fontsize=7, ncol=2)
    for i, row in enumerate(table):
        if not row["arm"].startswith("branch"):
            axes[1].scatter(row["inference_flops"] / 1e6, row["loss"]["mix"], color=f"C{i}", s=40)
            axes[1].annotate(f"{row['label']}, {row['train_flops'] / 1e12:.2f} TFLOPs", (row["inference_flops"] / 1e6,
                             row["loss"]["mix"]), fontsize=7, xytext=(6, -3), textcoords="offset points")
    axes[1].set_xlim(1.5, max(row["inference_flops"] for row in table) / 1e6 * 1.6)
    axes[1].set_xlabel("inference MFLOPs per token (2 x active params)")
    axes[1].set_ylabel("held-out loss on the mix (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("Branch-Train-MiX on prose, Python and C: held-out loss (training compute after the seed annotated)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-steps", type=int, default=600, help="pre-training steps of the seed on the mix")
    parser.add_argument("--branch-steps", type=int, default=200, help="training steps of each domain branch")
    parser.add_argument("--moe-steps", type=int, default=100, help="fine-tuning steps of the mixed MoE (router and all)")
    parser.add_argument("--top-k", type=int, default=2, choices=[1, 2], help="experts per token (of 3)")
    parser.add_argument("--gate-mode", choices=["hidden", "random"], default="hidden",
                        help="hidden: router rows from each domain's training snippets, minus the other domains'; or random")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of branches, MoE and dense")
    parser.add_argument("--train-chars", type=int, default=400_000, help="training characters per domain")
    parser.add_argument("--valid-chars", type=int, default=40_000, help="held-out characters per domain")
    parser.add_argument("--doc-chars", type=int, default=8_000, help="characters kept of each source file")
    parser.add_argument("--seed", type=int, default=0, help="the seed model's initialisation, data order and routers")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is 3x faster on a CPU other processes share)")
    parser.add_argument("--out", type=Path, default=Path("btx_experiment"))
    parser.add_argument("--figure", type=Path, default=None, help="also save the results figure here")
    parser.add_argument("--routing-figure", type=Path, default=None, help="also save (c)'s routing heatmap here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
