"""Conversion benchmark: wall time, throughput and peak RSS of ``moe-upcycle convert`` vs mergekit-moe on a ~0.8 GB checkpoint.

    python scripts/bench_convert.py [--workdir /tmp/bench_convert] [--experts 4 8] [--mergekit-python PYTHON] [--verify]

Builds a bf16 Llama-shaped dense checkpoint (random weights, written tensor by tensor, plus a tiny word-level
tokenizer, which mergekit-moe requires), converts it in a fresh process per run and reports wall time, output GB/s
and peak resident memory (VmHWM of that process), next to a plain file copy of the same output size as the I/O floor.

``--verify`` adds a row per E for ``moe-upcycle convert --verify`` (float32 logits of the dense and the MoE model on a
fixed batch), whose peak RSS is the largest of the run, with its ratio to the source size.

``--mergekit-python`` is the python of a separate virtual environment holding mergekit (its pins may clash with
ours), or that venv's folder; without it the mergekit rows are skipped. Set one up with

    python -m venv /tmp/mergekit-venv && /tmp/mergekit-venv/bin/pip install torch==2.13.0 mergekit

mergekit-moe then runs offline (HF_HUB_OFFLINE=1) with ``gate_mode: random``, ``architecture: mixtral``,
``dtype: bfloat16``, base model and all E experts = the dense source, and only its default CPU options (no --cuda,
no --lazy-unpickle/--low-cpu-memory/--async-write, default thread count, default 5e9-byte output shards, like
our default 5GB) plus the flags random gates with identical experts need.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, PreTrainedTokenizerFast

from moe_upcycle.checkpoint import PlannedTensor, write_sharded
from moe_upcycle.convert.plan import dense_layout

SHAPE = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False, dtype="bfloat16")
MERGEKIT_FLAGS = ["--i-understand-this-is-not-useful-without-training", "--random-seed", "0", "--quiet"]


def build_source(folder: Path, shape: dict | None = None, seed: int = 0) -> int:
    """Write a dense Llama of ``shape`` (LlamaConfig fields, default SHAPE) with N(0, 0.02) weights drawn from ``seed``,
    without ever holding more than one tensor; return its size in bytes."""
    config = LlamaConfig(**(shape or SHAPE))
    dtype, generator = config.dtype, torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    layout = dense_layout(config)

    def random(shape):
        return lambda: [(torch.randn(shape, generator=generator) * 0.02).to(dtype)]

    plan = [PlannedTensor(name, dtype, shape, random(shape)) for name, shape in layout.shapes.items()
            if name not in layout.tied_targets]  # a tied lm_head is not stored
    write_sharded(folder, plan, max_shard_bytes=2 * 10**9)
    return sum(t.nbytes for t in plan)


def ensure_tokenizer(folder: Path) -> None:
    """A tiny word-level tokenizer: mergekit-moe loads the base model's tokenizer even for random gates."""
    if (folder / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


# Runs a CLI entry point in a fresh interpreter and reports that process's own high-water RSS (VmHWM) at exit.
# (ru_maxrss from wait4 would include the parent's RSS inherited at fork, which Linux carries over exec.)
_MEASURED = """
import atexit, sys
def _report():
    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
    sys.stderr.write(f'VmHWM_KB={hwm}\\n')
atexit.register(_report)
"""
OURS = _MEASURED + "from moe_upcycle.cli import main\nsys.exit(main(sys.argv[1:]))\n"
MERGEKIT = _MEASURED + "sys.argv[0] = 'mergekit-moe'\nfrom mergekit.scripts.moe import main\nmain()\n"


def run_measured(python: str, code: str, args: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run ``code ARGS`` with ``python`` in a fresh process; return (wall seconds, peak RSS in GB) of that process."""
    start = time.perf_counter()
    proc = subprocess.run([python, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or "VmHWM_KB=" not in proc.stderr:
        raise SystemExit(f"{python} {' '.join(args)} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    hwm_kb = int(proc.stderr.rsplit("VmHWM_KB=", 1)[1].split()[0])
    return wall, hwm_kb * 1024 / 1e9


def find_mergekit(path: str | None) -> str | None:
    """The venv python that can import mergekit, given that python or its venv folder; None otherwise."""
    if not path:
        return None
    candidates = [Path(path)] if Path(path).is_file() else [Path(path) / "bin" / "python", Path(path) / "python"]
    for python in candidates:
        if python.is_file() and subprocess.run([str(python), "-c", "import mergekit.scripts.moe"],
                                               capture_output=True).returncode == 0:
            return str(python)
    return None


def timed_copy(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def tensor_bytes(folder: Path) -> tuple[int, int]:
    """(number of tensors, bytes of tensor data) over the folder's safetensors files, read from their headers."""
    count = total = 0
    for shard in folder.glob("*.safetensors"):
        with open(shard, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        tensors = [v for k, v in header.items() if k != "__metadata__"]
        count += len(tensors)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for v in tensors)
    return count, total


ROW = "{:<27}{:>4}{:>9}{:>11}{:>7}{:>13}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_convert"))
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--mergekit-python", help="python of a venv with mergekit installed, or that venv's folder")
    parser.add_argument("--verify", action="store_true", help="also measure moe-upcycle convert --verify")
    args = parser.parse_args()
    source = args.workdir / "dense"
    if not (source / "config.json").is_file():
        print(f"building the dense source in {source} ...", flush=True)
        build_source(source)
    ensure_tokenizer(source)
    subprocess.run(["sync"], check=True)
    source_gb = folder_bytes(source) / 1e9
    print(f"source: bf16 Llama, {SHAPE['num_hidden_layers']} layers, hidden {SHAPE['hidden_size']}, "
          f"intermediate {SHAPE['intermediate_size']}: {source_gb:.2f} GB; {os.cpu_count()} CPUs, torch threads default")
    mk_python = find_mergekit(args.mergekit_python)
    mk_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if mk_python:
        version = subprocess.run([mk_python, "-c", "import importlib.metadata as m; print(m.version('mergekit'), "
                                  "m.version('torch'), m.version('transformers'))"], capture_output=True, text=True)
        mk, mk_torch, mk_tf = version.stdout.split()
        print(f"mergekit {mk} (torch {mk_torch}, transformers {mk_tf}) at {mk_python}; mergekit-moe options: "
              f"{' '.join(MERGEKIT_FLAGS)} (all else default); config: gate_mode random, architecture mixtral, dtype bfloat16")
    else:
        why = f"{args.mergekit_python} has no importable mergekit" if args.mergekit_python else "no --mergekit-python given"
        print(f"note: mergekit rows skipped ({why}); enable them with: python -m venv /tmp/mergekit-venv && "
              "/tmp/mergekit-venv/bin/pip install torch==2.13.0 mergekit, then --mergekit-python /tmp/mergekit-venv/bin/python")
    print(f"ours: moe-upcycle convert --top-k 2 (torch {torch.__version__})")
    print(ROW.format("tool", "E", "wall s", "output GB", "GB/s", "peak RSS GB"))
    for experts in args.experts:
        out = args.workdir / f"moe{experts}"
        wall, rss = run_measured(sys.executable, OURS, ["convert", str(source), str(out), "--num-experts", str(experts),
                                                        "--top-k", "2", "--overwrite"])
        out_gb = folder_bytes(out) / 1e9
        print(ROW.format("moe-upcycle", experts, f"{wall:.1f}", f"{out_gb:.2f}", f"{out_gb / wall:.2f}", f"{rss:.2f}"))
        copy = args.workdir / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        copy_wall = timed_copy(out, copy)
        print(ROW.format("  cp -r + sync (I/O floor)", experts, f"{copy_wall:.1f}", f"{out_gb:.2f}",
                         f"{out_gb / copy_wall:.2f}", "-"), flush=True)
        shutil.rmtree(copy, ignore_errors=True)
        if args.verify:
            wall, rss = run_measured(sys.executable, OURS, ["convert", str(source), str(out), "--num-experts", str(experts),
                                                            "--top-k", "2", "--overwrite", "--verify"])
            print(ROW.format("moe-upcycle --verify", experts, f"{wall:.1f}", f"{out_gb:.2f}", "", f"{rss:.2f}")
                  + f"  ({rss / source_gb:.1f}x the source)", flush=True)
        if mk_python:
            mk_out = args.workdir / f"mergekit{experts}"
            shutil.rmtree(mk_out, ignore_errors=True)
            cfg = args.workdir / f"mergekit{experts}.yml"
            model = str(source.resolve())
            cfg.write_text(yaml.safe_dump({"base_model": model, "gate_mode": "random", "architecture": "mixtral",
                                           "dtype": "bfloat16", "experts_per_token": 2,
                                           "experts": [{"source_model": model} for _ in range(experts)]}, sort_keys=False))
            mk_wall, mk_rss = run_measured(mk_python, MERGEKIT, [str(cfg), str(mk_out), *MERGEKIT_FLAGS], env=mk_env)
            mk_gb = folder_bytes(mk_out) / 1e9
            print(ROW.format("mergekit-moe", experts, f"{mk_wall:.1f}", f"{mk_gb:.2f}", f"{mk_gb / mk_wall:.2f}",
                             f"{mk_rss:.2f}"))
            print(ROW.format("  ratio ours/mergekit", experts, f"{wall / mk_wall:.2f}", "", "", f"{rss / mk_rss:.2f}"))
            (n_ours, b_ours), (n_mk, b_mk) = tensor_bytes(out), tensor_bytes(mk_out)
            arch = json.loads((mk_out / "config.json").read_text()).get("architectures")
            ok = b_ours > 0 and abs(b_ours - b_mk) <= 0.03 * b_ours
            print(f"  check E={experts}: safetensors data ours {b_ours / 1e9:.3f} GB in {n_ours} tensors, mergekit "
                  f"{b_mk / 1e9:.3f} GB in {n_mk} tensors ({arch}): {'OK' if ok else 'MISMATCH'}", flush=True)
            shutil.rmtree(mk_out, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
