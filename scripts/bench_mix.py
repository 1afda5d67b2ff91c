"""Peak memory of ``moe-upcycle mix`` on three ~0.4 GB sources, side by side with ``moe-upcycle convert`` of one.

    python scripts/bench_mix.py [--workdir /tmp/bench_mix]

Builds three float32 Llama-shaped checkpoints of the same architecture (random weights from three seeds, written
tensor by tensor, with a small BPE tokenizer trained on CPython's documentation for the prompt-routed row) and, each
in a fresh process, reports wall time and peak resident memory (VmHWM of that process) of:

* ``moe-upcycle convert`` of the first source into 3 experts, top-2 (the streaming baseline);
* ``moe-upcycle mix`` of the first two, and of the three (Branch-Train-MiX: each source's MLPs one expert, the other
  tensors their float32 mean), ``gate_mode: random``: the peak should not grow with the number of sources;
* the three with ``gate_mode: hidden``: router rows from prompts, which runs the first source in float32.

Issue 13's target: mixing three 0.4 GB sources stays under 1 GB of peak RSS.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import yaml
from bench_convert import OURS, build_source, folder_bytes, run_measured

from moe_upcycle.demo import documentation_text, train_tokenizer

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
             num_key_value_heads=4, tie_word_embeddings=True, dtype="float32")
SOURCES = ("prose", "python", "c")
PROMPTS = {"prose": "The import statement", "python": "def main():", "c": "int main(void) {"}
ROW = "{:<44}{:>9}{:>13}{:>13}"


def recipe(workdir: Path, gate_mode: str, sources: tuple[str, ...] = SOURCES) -> Path:
    experts = [{"source_model": str(workdir / name)} for name in sources]
    if gate_mode == "hidden":
        for expert, name in zip(experts, sources, strict=True):
            expert["positive_prompts"] = [PROMPTS[name]]
    path = workdir / f"mix{len(sources)}_{gate_mode}.yaml"
    path.write_text(yaml.safe_dump({"gate_mode": gate_mode, "experts_per_token": 2, "nonexpert": "average",
                                    "experts": experts}, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_mix"))
    args = parser.parse_args()
    tokenizer = None
    for seed, name in enumerate(SOURCES):
        folder = args.workdir / name
        if not (folder / "config.json").is_file():
            print(f"building source {folder} ...", flush=True)
            build_source(folder, SHAPE, seed=seed)
        if not (folder / "tokenizer.json").is_file():
            tokenizer = tokenizer or train_tokenizer(documentation_text()[:100_000], vocab_size=1024)
            tokenizer.save_pretrained(folder)
    sizes = [folder_bytes(args.workdir / name) / 1e9 for name in SOURCES]
    print(f"sources: 3 float32 Llamas, {SHAPE['num_hidden_layers']} layers, hidden {SHAPE['hidden_size']}, "
          f"intermediate {SHAPE['intermediate_size']}, vocab {SHAPE['vocab_size']}: {' + '.join(f'{s:.2f}' for s in sizes)}"
          f" = {sum(sizes):.2f} GB; {os.cpu_count()} CPUs, torch {torch.__version__}")
    out = args.workdir / "out"
    runs = [("convert one source (3 experts, top-2)",
             ["convert", str(args.workdir / SOURCES[0]), str(out), "--num-experts", "3", "--top-k", "2"]),
            ("mix two (gate_mode random, average)", ["mix", str(recipe(args.workdir, "random", SOURCES[:2])), str(out)]),
            ("mix three (gate_mode random, average)", ["mix", str(recipe(args.workdir, "random")), str(out)]),
            ("mix three (gate_mode hidden, average)", ["mix", str(recipe(args.workdir, "hidden")), str(out)])]
    print(ROW.format("run", "wall s", "output GB", "peak RSS GB"))
    for label, argv in runs:
        wall, rss = run_measured(sys.executable, OURS, [*argv, "--overwrite"])
        print(ROW.format(label, f"{wall:.1f}", f"{folder_bytes(out) / 1e9:.2f}", f"{rss:.2f}"), flush=True)


if __name__ == "__main__":
    main()
