"""moe-upcycle push against the loopback Hub: round trip, updates, private/revision, adapters, failures."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM

import moe_upcycle
from moe_upcycle.cli import main
from moe_upcycle.convert.verify import fixed_batch

from .families import VOCAB, build_dense
from .hub_server import LocalHub

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
REPO = "test-user/tiny-moe"


@pytest.fixture
def hub(monkeypatch):
    with LocalHub() as server:
        server.configure_client(monkeypatch, token=True)
        yield server


@pytest.fixture
def converted(tmp_path):
    dense = build_dense("llama", tmp_path / "dense", shard_size="20KB")
    moe_upcycle.upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, max_shard_size="40KB")
    return tmp_path / "moe"


def _logits(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = fixed_batch(VOCAB)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_push_then_download_gives_identical_model(hub, converted, tmp_path, capsys):
    assert main(["push", str(converted), REPO, "--private", "--commit-message", "first upload"]) == 0
    out = capsys.readouterr().out
    assert "published" in out and hub.url in out
    assert hub.repos[REPO].private
    create = [r for r in hub.requests if r.path == "/api/repos/create"]
    assert create[0].json["visibility"] == "private"
    folder = snapshot_download(REPO, cache_dir=tmp_path / "cache")
    assert torch.equal(_logits(folder), _logits(converted))
    shards = json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert set(shards) <= set(hub.files(REPO))

    # a second push replaces the content with a new commit
    (converted / "README.md").write_text((converted / "README.md").read_text() + "\nUpdated.\n")
    assert main(["push", str(converted), REPO, "--commit-message", "second upload"]) == 0
    assert hub.history(REPO)[0] == "second upload"
    assert hub.files(REPO)["README.md"].endswith(b"Updated.\n")


def test_push_to_a_branch(hub, converted, capsys):
    assert main(["push", str(converted), REPO, "--revision", "experiment"]) == 0
    assert any(r.path.endswith("/commit/experiment") for r in hub.requests)
    assert "config.json" in hub.files(REPO, revision="experiment")
    assert "config.json" not in hub.files(REPO, revision="main")


def test_push_adapter_and_merged_folders(hub, small_models, docs_files, tmp_path, capsys):
    from moe_upcycle.train import run_training

    _, moe = small_models
    train, valid = docs_files
    run_training(["--model_name_or_path", str(moe), "--train_file", str(train), "--validation_file", str(valid),
                  "--output_dir", str(tmp_path / "lora"), "--block_size", "64", "--use_lora", "--max_steps", "2",
                  "--report_to", "none", "--save_strategy", "no", "--max_eval_samples", "8", "--disable_tqdm", "true"])
    assert main(["push", str(tmp_path / "lora"), "test-user/tiny-lora"]) == 0
    files = hub.files("test-user/tiny-lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert "training_args.bin" not in files  # pickles stay home
    assert b"library_name: peft" in files["README.md"] and str(moe).encode() in files["README.md"]

    # the merged model of the same run publishes as a full model with its own card
    assert main(["merge", str(tmp_path / "lora"), str(tmp_path / "merged")]) == 0
    assert main(["push", str(tmp_path / "merged"), "test-user/tiny-merged"]) == 0
    merged = hub.files("test-user/tiny-merged")
    assert {"config.json", "model.safetensors", "modeling_upcycled_moe.py", "README.md"} <= set(merged)
    assert b"library_name: transformers" in merged["README.md"]


def test_dry_run_touches_no_network(hub, converted, capsys):
    assert main(["push", str(converted), REPO, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload" in out and "config.json" in out and "UpcycledMoeForCausalLM" in out
    assert hub.requests == []


def _fails(capsys, args, *needles):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # upload progress bars may precede it; the error itself is one line, last, with no traceback
    errors = [line for line in err if line.startswith("moe-upcycle: error:")]
    assert len(errors) == 1 and err[-1] == errors[0] and not any("Traceback" in line for line in err), err
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_missing_shard_is_refused_before_any_request(hub, converted, capsys):
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    (converted / sorted(set(index["weight_map"].values()))[0]).unlink()
    _fails(capsys, ["push", str(converted), REPO], "missing")
    assert hub.requests == []


def test_invalid_repo_id(hub, converted, capsys):
    _fails(capsys, ["push", str(converted), "not a repo id"], "not valid")
    assert hub.requests == []


def test_unauthorized(hub, converted, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    _fails(capsys, ["push", str(converted), REPO], "HTTP 401", "hf auth login", "nothing new was published")
    assert REPO not in hub.repos


def test_server_error_publishes_nothing_and_a_retry_works(hub, converted, capsys):
    hub.fail_next(status=500, path_contains="/commit/")
    _fails(capsys, ["push", str(converted), REPO], "HTTP 500", "nothing new was published", "run the same command again")
    assert "config.json" not in hub.files(REPO)
    assert main(["push", str(converted), REPO]) == 0
    assert "config.json" in hub.files(REPO)


# ------------------------------------------------------------------ issue 10: items 7 and 12
def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_renders_the_card_into_the_upload_not_into_the_folder(hub, converted, capsys):
    """Item 7: the card goes into the commit; the folder is the same before and after, on success and on failure."""
    (converted / "README.md").unlink()
    before = _tree(converted)
    hub.fail_next(status=500, path_contains="/commit/")
    _fails(capsys, ["push", str(converted), REPO], "HTTP 500")
    assert _tree(converted) == before
    assert main(["push", str(converted), REPO]) == 0
    assert _tree(converted) == before
    assert b"UpcycledMoeForCausalLM" in hub.files(REPO)["README.md"]


def test_push_of_an_invalid_adapter_config(hub, converted, capsys):
    (converted / "adapter_config.json").write_text('{"peft_type": "LORA",')
    _fails(capsys, ["push", str(converted), REPO], "nothing was published", "adapter_config.json is not valid JSON")
    assert hub.requests == []


def test_push_with_broken_card_metadata(hub, converted, capsys):
    (converted / "README.md").write_text("---\nlicense: [apache-2.0\ntags: {moe\n---\n# A model\n")
    _fails(capsys, ["push", str(converted), REPO], "nothing was published", "YAML front matter", "does not parse")
    assert hub.requests == []


def test_push_of_a_dense_folder(hub, tmp_path, capsys):
    dense = build_dense("llama", tmp_path / "dense")
    _fails(capsys, ["push", str(dense), REPO], "nothing was published", "dense llama model", "moe-upcycle convert")
    assert hub.requests == [] and not (dense / "README.md").exists()


def test_push_to_an_unreachable_endpoint(hub, converted, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # loopback, closed port
    _fails(capsys, ["push", str(converted), REPO], "could not reach the Hub at http://127.0.0.1:9",
           "nothing new was published", "run the same command again")


def test_push_while_offline(hub, converted, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fails(capsys, ["push", str(converted), REPO], "HF_HUB_OFFLINE is set", "nothing was published")
    assert hub.requests == []


def test_push_to_an_unreachable_endpoint_in_a_real_process(converted, tmp_path):
    """What a shell sees (a 70-line traceback before): one line and exit status 2."""
    import os
    import subprocess
    import sys

    (converted / "README.md").unlink()
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test",
           "HF_HUB_DISABLE_XET": "1"}
    done = subprocess.run([sys.executable, "-m", "moe_upcycle.cli", "push", str(converted), REPO], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("moe-upcycle: error: could not reach the Hub"), done.stderr
    assert not (converted / "README.md").exists()
