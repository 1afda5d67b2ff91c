"""``moe-upcycle analyze`` (issue 13, item 4): the share of each data set's tokens each expert receives, per MoE layer.

Shares are counted per token (a row sums to top_k; see ``moe_upcycle/analysis.py``); the counts behind them are
(token, slot) assignments, tokens x top_k per row. Bad input is one ``moe-upcycle: error:`` line, exit status 2,
and nothing written.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_upcycle
from moe_upcycle.analysis import HEATMAP_FILE, REPORT_FILE, analyze
from moe_upcycle.cli import main

from .hostile import error_line, failure_problems, run_inprocess, snapshot, tree_problems

FAST = dict(block_size=32, batch_size=8, max_tokens=256)  # 8 blocks per data set: one forward pass each
FAST_FLAGS = ["--block_size", "32", "--batch_size", "8", "--max_tokens", "256"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory, docs_files) -> dict[str, Path]:
    """Two real domains: CPython's documentation prose and the standard library's Python source."""
    folder = tmp_path_factory.mktemp("analyze-data")
    prose, code = folder / "prose.txt", folder / "code.txt"
    prose.write_text(docs_files[1].read_text()[:12_000])
    code.write_text(Path(argparse.__file__).read_text()[:12_000])
    return {"prose": prose, "code": code}


def test_shares_counts_loss_and_files(small_models, texts, tmp_path):
    _, moe = small_models
    report = analyze(moe, texts, tmp_path / "routing", **FAST)
    assert report.moe_layers == [0, 1] and report.top_k == 2 and report.num_experts == 4
    assert report.datasets == ["prose", "code"] and report.tokens == [256, 256]
    # a row of shares sums to top_k (a token visits k experts); a row of counts to tokens x top_k
    torch.testing.assert_close(report.shares.sum(-1), torch.full((2, 2), 2.0, dtype=torch.float64))
    assert (report.counts.sum(-1) == 256 * 2).all()
    assert all(math.isfinite(loss) and loss > 0 for loss in report.loss)
    assert report.perplexity == pytest.approx([math.exp(loss) for loss in report.loss])
    written = json.loads((tmp_path / "routing" / REPORT_FILE).read_text())
    assert written["datasets"]["code"]["tokens"] == 256 and written["top_k"] == 2
    assert [layer["layer"] for layer in written["layers"]] == [0, 1]
    assert written["layers"][1]["shares"]["prose"] == pytest.approx(report.shares[1, 0].tolist())
    assert sum(written["layers"][0]["counts"]["code"]) == 512
    assert (tmp_path / "routing" / HEATMAP_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_is_what_evaluate_reports(small_models, texts):
    from moe_upcycle.train.evaluate_file import evaluate_file

    _, moe = small_models
    report = analyze(moe, {"prose": texts["prose"]}, **FAST)
    result = evaluate_file(str(moe), str(texts["prose"]), block_size=32, max_eval_samples=8)
    assert report.loss[0] == pytest.approx(result["eval_loss"], rel=1e-5)


def test_router_forced_to_expert_2_shows_share_one(small_models, texts, tmp_path, capfd):
    """A sigmoid router whose balancing bias of expert 2 outweighs every score (scores lie in (0, 1)) sends every
    token to expert 2 (and one other): its share is 1.0 in every layer and data set, whatever the second pick."""
    dense, _ = small_models
    forced = tmp_path / "forced"
    moe_upcycle.upcycle(dense, forced, num_experts=4, top_k=2, router_type="sigmoid")
    weights = load_file(forced / "model.safetensors")
    biases = [name for name in weights if name.endswith("gate.e_score_correction_bias")]
    assert len(biases) == 2
    for name in biases:
        weights[name][2] = 10.0
    save_file(weights, forced / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "routing"
    data = [f"{name}={path}" for name, path in texts.items()]
    outcome = run_inprocess(["analyze", forced, "--data", *data, "--output", out, *FAST_FLAGS], capfd)
    assert outcome.code == 0, outcome.describe()
    for layer in json.loads((out / REPORT_FILE).read_text())["layers"]:
        for shares in layer["shares"].values():
            assert shares[2] == 1.0 and sum(shares) == pytest.approx(2.0)
    assert "prose" in outcome.out and "  1.00" in outcome.out and str(out / REPORT_FILE) in outcome.out


def test_native_mixtral_twin_routes_the_same(small_models, texts, tmp_path):
    """The exported Mixtral computes our function: its routing report matches ours (router logits agree to ~1e-7,
    so at most a near-tie token may flip)."""
    from moe_upcycle.export import export_native

    _, moe = small_models
    export_native(moe, tmp_path / "mixtral", to="mixtral")
    ours, native = analyze(moe, texts, **FAST), analyze(tmp_path / "mixtral", texts, **FAST)
    assert native.moe_layers == ours.moe_layers and native.top_k == ours.top_k
    torch.testing.assert_close(native.shares, ours.shares, atol=2 / 256, rtol=0)
    assert native.loss == pytest.approx(ours.loss, rel=1e-4)


def test_native_qwen3_moe_with_dense_layers(small_models, texts, tmp_path):
    """Qwen3-MoE with a dense first layer (``mlp_only_layers``): only layer 1 is reported, with its own top-k."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dense, _ = small_models
    config = AutoConfig.for_model("qwen3_moe", vocab_size=512, hidden_size=32, intermediate_size=48,
                                  moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, num_experts=3, num_experts_per_tok=1,
                                  mlp_only_layers=[0])
    torch.manual_seed(0)
    folder = tmp_path / "qwen3_moe"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(dense / name, folder / name)
    report = analyze(folder, texts, **FAST)
    assert report.moe_layers == [1] and report.top_k == 1 and report.num_experts == 3
    torch.testing.assert_close(report.shares.sum(-1), torch.ones(1, 2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- refusals
def _world(tmp_path: Path, small_models, texts) -> dict[str, Path]:
    """A folder holding a copy of the models and the data, and a file of the user's beside them."""
    root = tmp_path / "world"
    dense, moe = small_models
    paths = {"root": root, "moe": root / "moe", "dense": root / "dense", "prose": root / "prose.txt",
             "code": root / "code.txt"}
    shutil.copytree(moe, paths["moe"])
    shutil.copytree(dense, paths["dense"])
    for name in ("prose", "code"):
        shutil.copy(texts[name], paths[name])
    (root / "notes.txt").write_text("the user's notes\n")
    return paths


BAD = {
    "dense_model": (lambda w: ["analyze", w["dense"], "--data", f"prose={w['prose']}"], "is a dense llama model"),
    "missing_file": (lambda w: ["analyze", w["moe"], "--data", f"prose={w['root'] / 'nope.txt'}"], "does not exist"),
    "no_equals": (lambda w: ["analyze", w["moe"], "--data", str(w["prose"])], "is not NAME=FILE"),
    "empty_name": (lambda w: ["analyze", w["moe"], "--data", f"={w['prose']}"], "is not NAME=FILE"),
    "duplicate_names": (lambda w: ["analyze", w["moe"], "--data", f"a={w['prose']}", f"a={w['code']}"], "names 'a' twice"),
    "empty_file": (lambda w: ["analyze", w["moe"], "--data", f"prose={w['root'] / 'empty.txt'}"], "is empty"),
    "too_short": (lambda w: ["analyze", w["moe"], "--data", f"prose={w['root'] / 'short.txt'}"], "fewer than block_size"),
    "output_is_model": (lambda w: ["analyze", w["moe"], "--data", f"prose={w['prose']}", "--output", w["moe"],
                                   "--overwrite"], "is the input"),
    "output_inside_model": (lambda w: ["analyze", w["moe"], "--data", f"prose={w['prose']}", "--output",
                                       w["moe"] / "routing"], "lies inside the input"),
    "output_contains_data": (lambda w: ["analyze", w["moe"], "--data", f"prose={w['prose']}", "--output", w["root"],
                                        "--overwrite"], "contains the input"),
    "output_is_foreign_folder": (lambda w: ["analyze", w["moe"], "--data", f"prose={w['prose']}", "--output",
                                            w["root"] / "thesis", "--overwrite"], "was not written by moe-upcycle"),
    "max_tokens_below_block": (lambda w: ["analyze", w["moe"], "--data", f"prose={w['prose']}", "--max_tokens", "8"],
                               "max_tokens=8 is invalid"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, small_models, texts, tmp_path, capfd):
    world = _world(tmp_path, small_models, texts)
    (world["root"] / "empty.txt").write_text("")
    (world["root"] / "short.txt").write_text("Hi.")
    (world["root"] / "thesis").mkdir()
    (world["root"] / "thesis" / "thesis.tex").write_text("years of work\n")
    argv, expected = BAD[case]
    before = snapshot(world["root"])
    outcome = run_inprocess([*argv(world), "--block_size", "32"], capfd)
    problems = failure_problems(outcome) + tree_problems(world["root"], before, snapshot(world["root"]))
    assert not problems, "; ".join(problems) + "\n" + outcome.describe()
    assert outcome.code == 2 and expected in error_line(outcome), outcome.describe()


def test_data_errors_name_the_data_set(small_models, tmp_path, capfd):
    _, moe = small_models
    missing = tmp_path / "gone.txt"
    assert main(["analyze", str(moe), "--data", f"prose={missing}"]) == 2
    assert f"--data prose={missing} does not exist" in capfd.readouterr().err
