"""``moe-upcycle shrink``: prune and merge give models that load, train and export; N = E gives back the input; the
grouping follows usage and router-logit similarity (MC-SMoE)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moe_upcycle.cli import main
from moe_upcycle.convert.shrink import groups
from moe_upcycle.convert.verify import fixed_batch

from .hostile import failure_problems, run_inprocess, snapshot, tree_problems


def _tensors(folder):
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out


@pytest.fixture(scope="module")
def data(docs_files, tmp_path_factory):
    path = tmp_path_factory.mktemp("shrink") / "data.txt"
    path.write_text(docs_files[1].read_text()[:6000])
    return path


def _shrink(model, out, n, method, data):
    return main(["shrink", str(model), str(out), "--num-experts", str(n), "--method", method, "--data", str(data),
                 "--block-size", "64"])


@pytest.mark.parametrize("method", ["prune", "merge"])
def test_shrink_loads_trains_and_exports(method, small_models, data, tmp_path):
    _, moe = small_models  # 4 experts, top-2, llama
    out = tmp_path / "small"
    assert _shrink(moe, out, 2, method, data) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 2 and config["num_experts_per_tok"] == 2
    assert config["upcycling"]["shrunk"]["method"] == method
    before, after = _tensors(moe), _tensors(out)
    gate = next(k for k in after if k.endswith("mlp.gate.weight"))
    assert after[gate].shape[0] == 2
    groups_of_layer = config["upcycling"]["shrunk"]["groups"]["0"]
    experts_key = next(k for k in after if k.startswith("model.model.layers.0.") and k.endswith("experts.down_proj"))
    if method == "prune":
        assert all(len(g) == 1 for g in groups_of_layer)
        kept = [g[0] for g in groups_of_layer]
        assert torch.equal(after[experts_key], before[experts_key][kept])
    else:
        assert sorted(e for g in groups_of_layer for e in g) == [0, 1, 2, 3]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    input_ids, mask = fixed_batch(model.config.text_config.vocab_size)
    assert torch.isfinite(model(input_ids=input_ids, attention_mask=mask).logits).all()
    assert main(["train", "--model_name_or_path", str(out), "--train_file", str(data), "--output_dir",
                 str(tmp_path / "run"), "--block_size", "32", "--per_device_train_batch_size", "2", "--max_steps", "2",
                 "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
                 "--dataloader_pin_memory", "false"]) == 0
    assert main(["export", str(out), str(tmp_path / "native")]) == 0


def test_keeping_every_expert_gives_back_the_input(small_models, data, tmp_path):
    _, moe = small_models
    for method in ("prune", "merge"):
        out = tmp_path / method
        assert _shrink(moe, out, 4, method, data) == 0
        before, after = _tensors(moe), _tensors(out)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_merge_groups_by_similarity_and_weights_by_usage():
    usage = torch.tensor([10.0, 1.0, 8.0, 2.0])
    similarity = torch.eye(4)
    similarity[1, 2] = similarity[2, 1] = 0.9  # expert 1 routes like expert 2
    similarity[3, 0] = similarity[0, 3] = 0.8
    assert groups(usage, similarity, 2, "merge") == {0: [0, 3], 2: [1, 2]}
    assert groups(usage, similarity, 2, "prune") == {0: [0], 2: [2]}


@pytest.mark.parametrize(("argv", "needle"), [
    (["--num-experts", "0"], "num_experts=0 is invalid"),
    (["--num-experts", "9"], "expected an integer in [1, 4]"),
])
def test_bad_inputs_fail_in_one_line_and_write_nothing(argv, needle, small_models, data, tmp_path, capfd):
    _, moe = small_models
    before = snapshot(tmp_path)
    outcome = run_inprocess(["shrink", moe, tmp_path / "out", "--data", data, *argv], capfd)
    assert not failure_problems(outcome) and needle in outcome.err, outcome.describe()
    assert not tree_problems(tmp_path, before, snapshot(tmp_path))


def test_data_errors_name_shrinks_own_flag(small_models, tmp_path, capfd):
    _, moe = small_models
    (tmp_path / "empty.txt").write_text("")
    outcome = run_inprocess(["shrink", moe, tmp_path / "out", "--num-experts", "2", "--data", tmp_path / "empty.txt"], capfd)
    assert not failure_problems(outcome) and f"--data {tmp_path / 'empty.txt'} is empty" in outcome.err, outcome.describe()
