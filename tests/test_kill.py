"""Kill test (issue 10): ``kill -9`` a ``moe-upcycle convert`` of a ~230 MB checkpoint at several points, then run
the same conversion normally into the same OUTPUT.

Afterwards no temporary folder of ours remains (``.OUT.tmp-*``, ``.OUT.old-*``), OUTPUT is complete (every tensor of
its index loads, and its shards are byte-identical to an uninterrupted run's), and an OUTPUT that existed before a
killed ``--overwrite`` is, right after the kill, either intact (byte-identical) or replaced by a complete new one.

The kill points are chosen by polling the temporary folder's size: early (the folder exists, the source is being
read), mid (40% of the output written), late (90%: the last shard is being written, the rename is next) and, for
``--overwrite``, the moment the old output is moved aside (the rename window).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .hostile import cli_env

pytestmark = pytest.mark.slow

RECIPE = ["--num-experts", "2", "--top-k", "1", "--max-shard-size", "100MB"]  # ~300 MB in 3 shards
INDEX = "model.safetensors.index.json"


def _write_dense(folder: Path) -> Path:
    """A dense Llama (vocab 32000, hidden 1024, intermediate 2816, 2 layers, tied, float32: ~235 MB), written directly
    with safetensors in three shards (faster than initialising a model)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=True, dtype="float32")
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied
    generator = torch.Generator().manual_seed(0)
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        tensor = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=generator) * 0.02
        if size and size + tensor.nbytes > 100_000_000:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += tensor.nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
    total = sum(t.nbytes for g in groups for t in g.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def _convert_in_process(*argv) -> None:
    from moe_upcycle.cli import main

    assert main(["convert", *map(str, argv)]) == 0


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file of ``folder`` (relative names), hidden files included."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            out[str(path.relative_to(folder))] = digest.hexdigest()
    return out


def _weights(hashes: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in hashes.items() if k.endswith(".safetensors") or k == INDEX}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """``(source, reference output's weight hashes, reference output size)``; the reference is an uninterrupted
    conversion, and the old OUTPUT of the ``--overwrite`` cases."""
    root = tmp_path_factory.mktemp("kill")
    source = _write_dense(root / "dense")
    reference = root / "reference"
    _convert_in_process(source, reference, *RECIPE)
    size = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file())
    yield source, reference, _weights(_hashes(reference)), size
    shutil.rmtree(root, ignore_errors=True)


def _leftovers(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith((f".{output.name}.tmp-", f".{output.name}.old-")))


def _folder_size(folders: list[Path]) -> int:
    total = 0
    for folder in folders:
        for dirpath, _, files in os.walk(folder):
            for name in files:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    pass
    return total


def _start(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moe_upcycle.cli", "convert", *map(str, argv)], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, output: Path, point: str, expected: int, timeout: float = 240) -> str:
    """SIGKILL ``proc`` at ``point``; return what was seen (``finished`` when the run ended first)."""
    parent, name = output.parent, output.name
    threshold = {"early": 0, "mid": 0.4 * expected, "late": 0.9 * expected}.get(point)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the conversion did not reach the {point} point in {timeout}s")
        if point == "rename":
            if any(parent.glob(f".{name}.old-*")):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return "killed with the old output moved aside"
            continue  # a tight loop: the window between the two renames is short
        tmps = list(parent.glob(f".{name}.tmp-*"))
        if tmps:
            size = _folder_size(tmps)
            if size >= threshold:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return f"killed with {size / 1e6:.0f} MB of {expected / 1e6:.0f} MB written"
        time.sleep(0.01)
    return f"finished before the kill (exit status {proc.returncode})"


def _assert_complete(output: Path, reference: dict[str, str] | None) -> None:
    """Every tensor named by OUTPUT's index loads from its shard; with ``reference``, the weights are byte-identical."""
    from safetensors import safe_open

    assert json.loads((output / "config.json").read_text())["model_type"] == "upcycled_moe"
    weight_map = json.loads((output / INDEX).read_text())["weight_map"]
    by_shard: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(tensor)
    for shard, names in by_shard.items():
        with safe_open(output / shard, framework="pt") as f:
            assert set(names) == set(f.keys()), shard
            for tensor in names:
                f.get_tensor(tensor)
    if reference is not None:
        assert _weights(_hashes(output)) == reference


@pytest.mark.parametrize("point", ["early", "mid", "late"])
def test_killed_conversion_then_normal_run(point, big, tmp_path):
    source, _, reference, size = big
    output = tmp_path / "out"
    proc = _start(source, output, *RECIPE)
    seen = _kill_when(proc, output, point, size)
    print(f"{point}: {seen}")
    if seen.startswith("killed"):
        assert not output.exists(), f"a killed conversion left a partial OUTPUT ({seen})"
    _convert_in_process(source, output, *RECIPE)
    assert _leftovers(output) == [], f"temporary folders remain after the next run ({seen})"
    _assert_complete(output, reference)
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("point", ["mid", "late", "rename"])
def test_killed_overwrite_keeps_or_replaces_output(point, big, tmp_path):
    source, reference, _, size = big
    output = tmp_path / "out"
    shutil.copytree(reference, output)
    before = _hashes(output)
    proc = _start(source, output, *RECIPE, "--seed", "1", "--overwrite")
    seen = _kill_when(proc, output, point, size)
    print(f"{point}: {seen}")
    if output.exists():
        now = _hashes(output)
        if now != before:  # replaced: then by a complete new output
            assert point != "mid", f"OUTPUT changed although the kill came before the rename ({seen})"
            _assert_complete(output, None)
            assert _weights(now) != _weights(before)
    else:
        # Killed between moving the old output aside and the new one in: the old one must be recoverable, and the
        # next run (even one that does not overwrite) restores it.
        assert any(output.parent.glob(f".{output.name}.old-*")), f"OUTPUT is gone and nothing can restore it ({seen})"
        from moe_upcycle.cli import main

        main(["convert", str(source), str(output), *RECIPE, "--seed", "1"])
        assert output.exists() and (_hashes(output) == before or _assert_complete(output, None) is None)
    _convert_in_process(source, output, *RECIPE, "--seed", "1", "--overwrite")
    assert _leftovers(output) == [], f"temporary folders remain after the next run ({seen})"
    _assert_complete(output, None)
    assert _weights(_hashes(output)) != _weights(before)
    shutil.rmtree(tmp_path, ignore_errors=True)
