"""Quality and size of quantised experts, side by side with the dense source and the float MoE model, in one run.

    python scripts/bench_quantized.py [--workdir demo_run] [--btx /tmp/btx_experiment] [--threads 1]

For the demo's fine-tuned MoE model (``moe-upcycle demo``: ``WORKDIR/moe-lora-merged``, held-out text
``WORKDIR/data/valid.txt``, statistics for ``--bits auto`` from ``WORKDIR/data/train.txt``) and, when it exists, the
mixing experiment's fine-tuned BTX model (``scripts/btx_experiment.py``: ``BTX/btx`` on ``BTX/data/mix.*.txt``),
quantises the MoE model with ``moe-upcycle quantize`` (int8, int4, and ``--bits auto`` at 6, 5, 4 and 3 bits average) and
prints for each variant:

* held-out perplexity (``moe-upcycle evaluate``'s computation, 128-token blocks);
* the share of (token, MoE layer) pairs whose top-k expert set differs from the float MoE model's;
* size on disk (the safetensors files), the experts' average stored bits;
* peak memory: in a fresh process, the high-water RSS (VmHWM) above the RSS before loading (``/proc/self/clear_refs``
  resets the mark after the imports), once ``from_pretrained`` returned ("load peak") and after the forwards below
  ("in use"). Transformers maps the safetensors files, so most weights become resident on first use, not while
  loading: "in use" is what the model costs;
* forward time on CPU: the median of 5 no-grad forwards of a 4 x 128-token batch, after 2 warm-up calls, in that
  same process, with ``--threads`` torch threads.

The demo models are a few MB, below what RSS resolves, so the memory claim (the int4 model's peak is below the float
model's by at least the expert bytes int4 saves) is checked on a larger model built here: a random float32 Llama
(hidden 1024, intermediate 2816, 4 layers) upcycled to 4 experts on every layer (0.6 GB), and its int8 and int4
quantisations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_upcycle
from moe_upcycle.checkpoint import SafetensorsCheckpoint
from moe_upcycle.convert.converter import upcycle
from moe_upcycle.convert.quantize import quantize
from moe_upcycle.train.evaluate_file import evaluate_file

GROUP_SIZE = 32  # divides the demo's hidden size (128) and intermediate size (352)
ROW = "{:<22}{:>11}{:>13}{:>10}{:>8}{:>14}{:>14}{:>12}"

# In a fresh process: load the model, report the loading peak above the RSS before it, then time forwards.
_CHILD = """
import json, statistics, sys, time
import torch
import moe_upcycle
from transformers import AutoModelForCausalLM

def status(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024

torch.set_num_threads(int(sys.argv[2]))
open('/proc/self/clear_refs', 'w').write('5')  # the high-water mark restarts from the current RSS
before = status('VmRSS')
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
load_peak = status('VmHWM') - before
ids = torch.randint(0, model.config.get_text_config().vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
times = []
with torch.no_grad():
    for i in range(7):
        start = time.perf_counter()
        model(input_ids=ids)
        times.append(time.perf_counter() - start)
print(json.dumps({'load_peak': load_peak, 'peak': status('VmHWM') - before, 'forward': statistics.median(times[2:])}))
"""


@dataclass
class Row:
    label: str
    folder: Path
    perplexity: float = float("nan")
    routing_changed: float | None = None
    size: int = 0
    bits: float | None = None
    load_peak: int = 0
    peak: int = 0
    forward: float = 0.0


def measure_process(folder: Path, threads: int, repeats: int = 1) -> dict:
    """The child's figures, each the median over ``repeats`` fresh processes (the allocator's high-water marks vary by
    a few tens of MB from one process to the next)."""
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(threads)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"measuring {folder} failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def expert_bytes(folder: Path) -> int:
    return sum(t.nbytes for name, t in SafetensorsCheckpoint(folder).info.items()
               if ".experts." in name and not name.endswith("_bias"))


@torch.no_grad()
def top_k_sets(folder: Path, blocks: torch.Tensor) -> list[torch.Tensor]:
    """Per MoE layer, the sorted top-k expert ids of every token of ``blocks`` [N, S]: [N*S, k] each."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    k = model.config.num_experts_per_tok
    per_layer: list[list[torch.Tensor]] = []
    for row in blocks.split(4):
        logits = model(input_ids=row, output_router_logits=True).router_logits  # one [B*S, E] per MoE layer
        for layer, scores in enumerate(logits):
            if len(per_layer) <= layer:
                per_layer.append([])
            per_layer[layer].append(scores.topk(k, dim=-1).indices.sort(dim=-1).values)
    return [torch.cat(parts) for parts in per_layer]


def held_out_blocks(folder: Path, text_file: Path, block_size: int = 128, count: int = 32) -> torch.Tensor:
    ids = AutoTokenizer.from_pretrained(folder)(text_file.read_text())["input_ids"]
    usable = min(count, len(ids) // block_size)
    return torch.tensor(ids[: usable * block_size]).view(usable, block_size)


def bench(name: str, dense: Path | None, moe: Path, valid: Path, train: Path, work: Path, threads: int) -> list[Row]:
    rows = ([Row("dense source", dense)] if dense else []) + [Row("MoE, float experts", moe)]
    variants = {"int8 experts": dict(experts="int8"), "int4 experts": dict(experts="int4"),
                **{f"--bits auto, {b} bits": dict(bits="auto", target_bits=float(b), data=train) for b in (6, 5, 4, 3)}}
    for label, options in variants.items():
        out = work / name / label.replace(" ", "_").replace(",", "").replace("-", "")
        quantize(moe, out, group_size=GROUP_SIZE, block_size=128, overwrite=True, **options)
        rows.append(Row(label, out))
    blocks = held_out_blocks(moe, valid)
    reference = top_k_sets(moe, blocks)
    for row in rows:
        row.perplexity = evaluate_file(str(row.folder), str(valid), block_size=128)["perplexity"]
        row.size = folder_size(row.folder)
        config = json.loads((row.folder / "config.json").read_text())
        if config.get("model_type") == "upcycled_moe":
            row.bits = (config.get("upcycling", {}).get("quantized") or {}).get("average_bits")
            if row.bits is not None:
                changed = [(a != b).any(dim=-1) for a, b in zip(reference, top_k_sets(row.folder, blocks), strict=True)]
                row.routing_changed = torch.cat(changed).float().mean().item()
            else:  # the float MoE model itself
                dtype = next(t.dtype for n, t in SafetensorsCheckpoint(row.folder).info.items() if ".experts." in n)
                row.routing_changed, row.bits = 0.0, 8 * dtype.itemsize
        measured = measure_process(row.folder, threads)
        row.load_peak, row.peak, row.forward = measured["load_peak"], measured["peak"], measured["forward"]
    return rows


MEMORY_SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                    num_key_value_heads=4, dtype="float32")


def memory_bench(work: Path, threads: int, repeats: int = 5) -> list[Row]:
    """Peak memory and forward time of the larger random model (float experts, int8, int4): medians of ``repeats``
    processes."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_convert import build_source

    build_source(work / "big-dense", MEMORY_SHAPE)
    upcycle(work / "big-dense", work / "big-moe", num_experts=4, top_k=2, overwrite=True)
    rows = [Row("MoE, float experts", work / "big-moe")]
    for scheme in ("int8", "int4"):
        quantize(work / "big-moe", work / f"big-{scheme}", experts=scheme, overwrite=True)
        rows.append(Row(f"{scheme} experts", work / f"big-{scheme}"))
    for row in rows:
        row.size = folder_size(row.folder)
        config = json.loads((row.folder / "config.json").read_text())
        row.bits = (config.get("upcycling", {}).get("quantized") or {}).get("average_bits", 32.0)
        measured = measure_process(row.folder, threads, repeats)
        row.load_peak, row.peak, row.forward = measured["load_peak"], measured["peak"], measured["forward"]
    return rows


def show(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    print(ROW.format("model", "perplexity", "routing chg", "size MB", "bits/w", "load peak MB", "in use MB", "forward ms"))
    for r in rows:
        print(ROW.format(r.label, "-" if r.perplexity != r.perplexity else f"{r.perplexity:.2f}",
                         "-" if r.routing_changed is None else f"{100 * r.routing_changed:.1f}%",
                         f"{r.size / 1e6:.2f}", "-" if r.bits is None else f"{r.bits:.2f}", f"{r.load_peak / 1e6:.1f}",
                         f"{r.peak / 1e6:.1f}",
                         f"{1000 * r.forward:.1f}"))


def check_memory(rows: list[Row]) -> None:
    """The int4 model's peak (loaded and run) is below the float model's by at least the expert bytes int4 saves."""
    by_label = {r.label: r for r in rows}
    float_row, int4 = by_label["MoE, float experts"], by_label["int4 experts"]
    saved = expert_bytes(float_row.folder) - expert_bytes(int4.folder)
    drop = float_row.peak - int4.peak
    verdict = "holds" if drop >= saved else "does NOT hold"
    print(f"peak memory, loaded and run: float {float_row.peak / 1e6:.1f} MB, int4 {int4.peak / 1e6:.1f} MB: "
          f"{drop / 1e6:.1f} MB lower; int4 saves {saved / 1e6:.1f} MB of expert tensors: the claim {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo_run"), help="the folder `moe-upcycle demo` wrote")
    parser.add_argument("--btx", type=Path, default=Path("/tmp/btx_experiment"),
                        help="scripts/btx_experiment.py's --out folder (skipped when missing)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the timed forwards (default 1)")
    args = parser.parse_args()
    if not (args.workdir / "moe-lora-merged").is_dir():
        raise SystemExit(f"{args.workdir / 'moe-lora-merged'} is missing: run `moe-upcycle demo --workdir {args.workdir}` first")
    print(f"moe_upcycle {moe_upcycle.__version__}, torch {torch.__version__}, {args.threads} thread(s)")
    with tempfile.TemporaryDirectory(prefix="bench_quantized_") as tmp:
        demo = bench("demo", args.workdir / "dense", args.workdir / "moe-lora-merged", args.workdir / "data" / "valid.txt",
                     args.workdir / "data" / "train.txt", Path(tmp), args.threads)
        show(f"demo: {args.workdir / 'moe-lora-merged'} (8 experts, top-2, every layer), held-out "
             f"{args.workdir / 'data/valid.txt'}", demo)
        if (args.btx / "btx").is_dir():
            btx = bench("btx", None, args.btx / "btx", args.btx / "data" / "mix.valid.txt",
                        args.btx / "data" / "mix.train.txt", Path(tmp), args.threads)
            show(f"mixing experiment: {args.btx / 'btx'}, held-out {args.btx / 'data/mix.valid.txt'}", btx)
        else:
            print(f"\n(no mixing-experiment model at {args.btx / 'btx'}: run scripts/btx_experiment.py to add its table)")
        big = memory_bench(Path(tmp), args.threads)
        show("memory: a random float32 Llama (hidden 1024, intermediate 2816, 4 layers) upcycled to 4 experts, top-2; "
             "medians of 5 processes", big)
        check_memory(big)


if __name__ == "__main__":
    main()
