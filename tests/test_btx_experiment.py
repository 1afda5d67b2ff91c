"""scripts/btx_experiment.py end to end on tiny settings: seed, three branches, mix, fine-tuning, every arm evaluated."""

import importlib.util
import json
import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from moe_upcycle.demo import DemoModelSpec
from moe_upcycle.train.evaluate_file import evaluate_file

from .conftest import SMALL_SPEC

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

pytestmark = pytest.mark.skipif(next(Path("/usr/include").rglob("*.h"), None) is None,
                                reason="no C headers under /usr/include: the experiment's C domain")


def load_script(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # it imports its helpers from compare_upcycling.py beside it
    spec = importlib.util.spec_from_file_location("btx_experiment", SCRIPTS / "btx_experiment.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


TINY_SPEC = partial(DemoModelSpec, **{**SMALL_SPEC, "block_size": 32, "batch_size": 4})  # the script sets train_steps


def test_experiment_on_tiny_settings(tmp_path, monkeypatch, capsys, request):
    script = load_script(monkeypatch)
    request.addfinalizer(partial(torch.set_num_threads, torch.get_num_threads()))  # --threads 1 sets it process-wide
    monkeypatch.setattr(script, "DemoModelSpec", TINY_SPEC)
    script.main(["--seed-steps", "4", "--branch-steps", "2", "--moe-steps", "2", "--train-chars", "20000",
                 "--valid-chars", "4000", "--threads", "1", "--out", str(tmp_path),
                 "--figure", str(tmp_path / "figure.png"), "--routing-figure", str(tmp_path / "routing.png")])
    results = json.loads((tmp_path / "results.json").read_text())
    arms = {row["arm"]: row for row in results["arms"]}
    assert list(arms) == list(script.ARMS)
    for row in arms.values():
        assert set(row["loss"]) == {"prose", "python", "c", "mix"}
        assert all(math.isfinite(v) and v > 0 for v in (*row["loss"].values(), row["inference_flops"]))
    # the dense arm gets at least the compute of branches + MoE fine-tuning; the ensemble costs 3 dense forwards
    assert arms["dense"]["train_flops"] >= arms["btx"]["train_flops"] > arms["ensemble"]["train_flops"] > 0
    dense_forward = arms["seed"]["inference_flops"]
    assert arms["ensemble"]["inference_flops"] == 3 * dense_forward
    assert dense_forward < arms["btx"]["inference_flops"] < 3 * dense_forward
    # averaging probabilities never does worse than the members' mean loss (Jensen), on every held-out set
    for name in ("prose", "python", "c", "mix"):
        members = [arms[f"branch-{d}"]["loss"][name] for d in ("prose", "python", "c")]
        assert arms["ensemble"]["loss"][name] <= sum(members) / 3 + 1e-6
    # analyze and evaluate_file read the same blocks as the comparison
    routes = results["routing"]["btx"]
    for name, loss in routes["loss"].items():
        assert abs(loss - arms["btx"]["loss"][name]) < 1e-4
    prose = evaluate_file(str(tmp_path / "seed"), str(tmp_path / "data" / "prose.valid.txt"), block_size=32)
    assert abs(prose["eval_loss"] - arms["seed"]["loss"]["prose"]) < 1e-4
    shares = routes["share"]  # [layer][domain][expert], a row sums to top_k
    assert all(abs(sum(row) - routes["top_k"]) < 1e-6 for layer in shares for row in layer)
    for name in ("btx_experiment.png", "figure.png", "routing.png", "routing-btx/routing.json", "recipe.json"):
        assert (tmp_path / name).is_file(), name
    out = capsys.readouterr().out
    assert "(c) minus (a) dense, = compute" in out and "wall time: corpus" in out
