"""Conversion benchmark: wall time, throughput and peak RSS of ``moe-upcycle convert`` on a ~0.8 GB checkpoint.

    python scripts/bench_convert.py [--workdir /tmp/bench_convert] [--experts 4 8]

Builds a bf16 Llama-shaped dense checkpoint (random weights, written tensor by tensor), converts it in a
fresh process per run and reports wall time, output GB/s and peak resident memory (ru_maxrss of that
process), next to a plain file copy of the same output size as the I/O floor.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from moe_upcycle.convert.plan import dense_layout
from moe_upcycle.convert.safetensors_io import PlannedTensor, write_sharded

SHAPE = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False, dtype="bfloat16")


def build_source(folder: Path) -> int:
    """Write the dense checkpoint without ever holding more than one tensor; return its size in bytes."""
    config = LlamaConfig(**SHAPE)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    layout = dense_layout(config)

    def random(shape):
        return lambda: [(torch.randn(shape) * 0.02).to(torch.bfloat16)]

    plan = [PlannedTensor(name, torch.bfloat16, shape, random(shape)) for name, shape in layout.shapes.items()]
    write_sharded(folder, plan, max_shard_bytes=2 * 10**9)
    return sum(t.nbytes for t in plan)


# Runs the CLI in a fresh interpreter and reports that process's own high-water RSS (VmHWM) at exit.
# (ru_maxrss from wait4 would include the parent's RSS inherited at fork, which Linux carries over exec.)
_MEASURED_CLI = """
import atexit, sys
def _report():
    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
    sys.stderr.write(f'VmHWM_KB={hwm}\\n')
atexit.register(_report)
from moe_upcycle.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_measured(args: list[str]) -> tuple[float, float]:
    """Run ``moe-upcycle ARGS`` in a fresh process; return (wall seconds, peak RSS in GB) of that process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURED_CLI, *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"moe-upcycle {' '.join(args)} failed:\n{proc.stderr}")
    hwm_kb = int(proc.stderr.rsplit("VmHWM_KB=", 1)[1].split()[0])
    return wall, hwm_kb * 1024 / 1e9


def timed_copy(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_convert"))
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    source = args.workdir / "dense"
    if not (source / "config.json").is_file():
        print(f"building the dense source in {source} ...", flush=True)
        build_source(source)
    subprocess.run(["sync"], check=True)
    source_gb = folder_bytes(source) / 1e9
    print(f"source: bf16 Llama, {SHAPE['num_hidden_layers']} layers, hidden {SHAPE['hidden_size']}, "
          f"intermediate {SHAPE['intermediate_size']}: {source_gb:.2f} GB")
    print(f"{'run':<26}{'output GB':>10}{'wall s':>9}{'GB/s':>7}{'peak RSS GB':>13}{'RSS/output':>12}")
    for experts in args.experts:
        out = args.workdir / f"moe{experts}"
        wall, rss = run_measured(["convert", str(source), str(out), "--num-experts", str(experts), "--top-k", "2",
                                  "--overwrite"])
        out_gb = folder_bytes(out) / 1e9
        label = f"moe-upcycle E={experts}"
        print(f"{label:<26}{out_gb:>10.2f}{wall:>9.1f}{out_gb / wall:>7.2f}{rss:>13.2f}{rss / out_gb:>12.2f}")
        copy = args.workdir / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        wall = timed_copy(out, copy)
        print(f"{'  cp -r + sync (I/O floor)':<26}{out_gb:>10.2f}{wall:>9.1f}{out_gb / wall:>7.2f}{'-':>13}{'':>12}")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
