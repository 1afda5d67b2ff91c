"""scripts/compare_upcycling.py end to end on tiny settings: one source run with two checkpoints, four arms each."""

import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_upcycle.demo import DemoModelSpec

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_upcycling.py"


def load_script():
    spec = importlib.util.spec_from_file_location("compare_upcycling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_continuation_reads_the_data_the_source_would_have_read_next():
    script = load_script()
    whole = script.batch_order(96, 0, 20)
    assert torch.equal(script.batch_order(96, 7, 13), whole[7:])
    assert sorted(whole[:6].flatten().tolist()) == list(range(96))  # an epoch is a permutation


@dataclass
class TinySpec(DemoModelSpec):
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    vocab_size: int = 512


def test_sweep_on_tiny_settings(tmp_path, monkeypatch, capsys):
    script = load_script()
    monkeypatch.setattr(script, "BATCH", 2)
    monkeypatch.setattr(script, "DemoModelSpec", TinySpec)
    script.main(["--corpus", "docs", "--pretrain-steps", "4", "2", "--steps", "2", "--eval-every", "2", "--valid-blocks", "4",
                 "--device", "cpu", "--workers", "1", "--out", str(tmp_path), "--figure", str(tmp_path / "figure.png")])
    results = json.loads((tmp_path / "results.json").read_text())
    source = {c["step"]: c["val_loss"] for c in results["source"]["curve"]}
    assert [p["pretrain_steps"] for p in results["sweep"]] == [2, 4]
    for point in results["sweep"]:
        dense, upcycled, drop, dense_c = point["arms"]
        # every arm starts from the saved checkpoint; the upcycled model computes exactly what it did
        assert abs(dense["curve"][0]["val_loss"] - source[point["pretrain_steps"]]) < 1e-5
        assert abs(upcycled["curve"][0]["val_loss"] - dense["curve"][0]["val_loss"]) < 1e-4
        equal_compute = math.ceil(2 * upcycled["active_params"] / dense["active_params"])
        assert [a["curve"][-1]["step"] for a in point["arms"]] == [2, 2, 2, equal_compute]
        assert dense_c["curve"][-1]["flops"] >= upcycled["curve"][-1]["flops"] > dense["curve"][-1]["flops"]
        assert point["lr"] == script.source_lr(point["pretrain_steps"], 3e-3)
    assert (tmp_path / "upcycling_sweep.png").is_file() and (tmp_path / "figure.png").is_file()
    out = capsys.readouterr().out
    assert "upc =C" in out and "wall time: corpus and tokenizer" in out
