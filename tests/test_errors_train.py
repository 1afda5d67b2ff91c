"""Bad input to train, merge and evaluate (issue 10, items 4, 9, 10, 11): one clear line, exit status 2, no traceback,
nothing left behind; resuming with ``--resume_from_checkpoint true``; a compact console log; adapters that find their
base model from anywhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_upcycle.cli import main

FAST = ["--block_size", "32", "--per_device_train_batch_size", "2", "--max_eval_samples", "2", "--report_to", "none",
        "--save_strategy", "no", "--dataloader_pin_memory", "false", "--disable_tqdm", "true"]


@pytest.fixture
def text(docs_files, tmp_path) -> tuple[Path, Path]:
    """A little training and validation text (a few dozen blocks of 32 tokens)."""
    train, valid = docs_files
    (tmp_path / "train.txt").write_text(train.read_text()[:4000])
    (tmp_path / "valid.txt").write_text(valid.read_text()[:2000])
    return tmp_path / "train.txt", tmp_path / "valid.txt"


def _train_argv(model, train, out, *extra, valid=None) -> list[str]:
    return ["train", "--model_name_or_path", str(model), "--train_file", str(train), "--output_dir", str(out), *FAST,
            "--max_steps", "1", *(["--validation_file", str(valid)] if valid else []), *extra]


def _fails(capsys, argv, *needles) -> str:
    """``main(argv)`` exits with 2 and stderr ends with its only ``moe-upcycle: error:`` line, holding ``needles``."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("moe-upcycle: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and not any("Traceback" in line for line in err), err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _fails_in_a_process(argv, *needles) -> None:
    """The same, seen from a shell: a real process, whose uncaught exceptions would print a traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "moe_upcycle.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and err and err[-1].startswith("moe-upcycle: error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for needle in needles:
        assert needle in err[-1], err[-1]


# ------------------------------------------------------------------------------------------------ train
@pytest.mark.parametrize("extra, needle", [
    (["--max_steps", "0"], "trains 0 steps"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "trains 0 steps"),
    (["--router_aux_loss_coef", "inf"], "router_aux_loss_coef=inf is invalid: expected a finite number >= 0"),
    (["--router_aux_loss_coef", "nan"], "router_aux_loss_coef=nan is invalid"),
    (["--router_z_loss_coef", "inf"], "router_z_loss_coef=inf is invalid"),
    (["--router-aux-loss-coef", "-1"], "router_aux_loss_coef=-1.0 is invalid"),
    (["--use_lora", "--lora_target", ""], "lora_target='' names nothing to adapt"),
    (["--max_train_samples", "0"], "max_train_samples=0 is invalid"),
])
def test_training_options_that_cannot_train(small_models, text, tmp_path, capsys, extra, needle):
    """Item 4 (a 0-step run; a non-finite router loss weight) and ``--lora_target ''``: refused before any work."""
    _, moe = small_models
    _fails(capsys, _train_argv(moe, text[0], tmp_path / "run", *extra), needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind, needle", [
    ("empty", "is empty"),
    ("malformed_jsonl", "line 3 is not a JSON object"),
    ("shorter_than_a_block", "fewer than block_size=32 tokens"),
    ("too_few_to_split", "too few to hold out 5% for validation"),
])
def test_bad_training_data(small_models, text, tmp_path, capsys, kind, needle):
    """Item 9: data that cannot train is one line, and no (empty) output folder is left."""
    _, moe = small_models
    train, valid = text
    data, validation = tmp_path / "data.txt", valid
    if kind == "empty":
        data.write_text("")
    elif kind == "malformed_jsonl":
        data = tmp_path / "data.jsonl"
        data.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "an unfinished record\n{"text": "four"}\n')
        validation = tmp_path / "valid.jsonl"
        validation.write_text(json.dumps({"text": valid.read_text()}) + "\n")
    elif kind == "shorter_than_a_block":
        data.write_text("Hi.")
    elif kind == "too_few_to_split":
        data.write_text("Hi.")
        validation = None
    _fails(capsys, _train_argv(moe, data, tmp_path / "run", valid=validation), needle)
    assert not (tmp_path / "run").exists()


def test_missing_model_folder_is_one_line_in_a_real_process(text, tmp_path):
    """Item 9: a model folder that does not exist (68 lines of traceback before)."""
    _fails_in_a_process(_train_argv(tmp_path / "no_such_model", text[0], tmp_path / "run"),
                        "--model_name_or_path", "does not exist")
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_a_file_is_refused_before_loading(small_models, text, tmp_path, capsys, monkeypatch):
    _, moe = small_models
    (tmp_path / "run").write_text("notes\n")
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: pytest.fail("loaded a tokenizer"))
    _fails(capsys, _train_argv(moe, text[0], tmp_path / "run"), "--output_dir", "is a file")
    assert (tmp_path / "run").read_text() == "notes\n"


def test_output_dir_must_not_be_an_input(small_models, text, tmp_path, capsys):
    """Training into the model folder (or a folder holding it) would change the model it reads."""
    _, moe = small_models
    model = shutil.copytree(moe, tmp_path / "moe")
    before = sorted(p.name for p in model.iterdir())
    _fails(capsys, _train_argv(model, text[0], model), "is the input")
    _fails(capsys, _train_argv(model, text[0], tmp_path), "contains the input")
    assert sorted(p.name for p in model.iterdir()) == before


def test_resume_from_nowhere(small_models, text, tmp_path, capsys):
    """Item 9: a checkpoint path pointing nowhere, or ``true`` with no checkpoint: one line, no empty output folder."""
    _, moe = small_models
    _fails(capsys, _train_argv(moe, text[0], tmp_path / "run", "--resume_from_checkpoint", tmp_path / "nowhere"),
           "--resume_from_checkpoint", "does not exist")
    assert not (tmp_path / "run").exists()
    _fails(capsys, _train_argv(moe, text[0], tmp_path / "run", "--resume_from_checkpoint", "true"),
           "found no checkpoint-N folder in --output_dir")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def lora_run(small_models, docs_files, tmp_path_factory) -> Path:
    """Two LoRA steps (a checkpoint after each) started from the model's folder by a *relative* path, logging
    every step; ``console.txt`` holds what it printed."""
    import contextlib
    import io

    _, moe = small_models
    train, valid = docs_files
    run = tmp_path_factory.mktemp("lora") / "run"
    cwd = os.getcwd()
    os.chdir(moe.parent)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(_train_argv(moe.name, train, run, "--use_lora", "--max_steps", "2", "--logging_steps", "1",
                                    "--save_strategy", "steps", "--save_steps", "1", valid=valid))
    finally:
        os.chdir(cwd)
    assert code == 0
    (run.parent / "console.txt").write_text(stdout.getvalue())
    return run


def test_console_log_is_compact_but_every_key_is_kept(lora_run):
    """The console shows the model-wide moe/* summary; trainer_state.json keeps every per-layer, per-expert key."""
    console = [line for line in (lora_run.parent / "console.txt").read_text().splitlines() if "'loss'" in line]
    assert len(console) == 2
    for line in console:
        assert "moe/aux_loss" in line and "moe/entropy" in line and "moe/layer" not in line and len(line) < 400, line
    history = json.loads((lora_run / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert len(logged) == 2 and all("moe/layer0/expert0" in entry and "moe/layer1/entropy" in entry for entry in logged)


def test_adapter_records_an_absolute_base_path(lora_run, small_models):
    _, moe = small_models
    base = json.loads((lora_run / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(moe.resolve())


def test_resume_true_continues_from_the_last_checkpoint(lora_run, small_models, docs_files, tmp_path, capsys):
    _, moe = small_models
    train, valid = docs_files
    run = shutil.copytree(lora_run, tmp_path / "run")
    assert main(_train_argv(moe, train, run, "--use_lora", "--max_steps", "3", "--logging_steps", "1",
                            "--resume_from_checkpoint", "true", valid=valid)) == 0
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == [1, 2, 3]  # steps 1-2 come from checkpoint-2, only step 3 was trained again
    history = json.loads((lora_run / "trainer_state.json").read_text())["log_history"]
    assert [e["loss"] for e in state["log_history"] if "loss" in e][:2] == [e["loss"] for e in history if "loss" in e]


# ------------------------------------------------------------------------------------------------ merge
def test_merge_finds_a_relative_base_beside_the_adapter(lora_run, small_models, tmp_path, monkeypatch, capsys):
    """Item 11: an adapter recording a relative base path, merged from another directory."""
    _, moe = small_models
    project = tmp_path / "project"
    adapter = shutil.copytree(lora_run, project / "lora", ignore=shutil.ignore_patterns("checkpoint-*"))
    shutil.copytree(moe, adapter / "base")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "base"  # relative to the adapter folder, not to where merge runs
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["merge", str(adapter), "../merged"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.parametrize("kind, needles", [
    ("invalid_json", ["adapter_config.json is not valid JSON"]),
    ("not_an_object", ["holds a JSON list, not an object"]),
    ("r_string", ["has r='sixteen', expected int"]),
    ("base_gone", ["the adapter's base model", "does not exist"]),
    ("relative_base_nowhere", ["demo_run/moe", "set base_model_name_or_path"]),
])
def test_merge_bad_adapter(lora_run, tmp_path, capsys, monkeypatch, kind, needles):
    """Item 11: an invalid adapter_config.json, a base model folder that is gone, a relative base found nowhere."""
    monkeypatch.chdir(tmp_path)  # "nowhere" also for a checkout where `moe-upcycle demo` wrote demo_run/
    adapter = shutil.copytree(lora_run, tmp_path / "lora", ignore=shutil.ignore_patterns("checkpoint-*"))
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    if kind == "invalid_json":
        path.write_text('{"peft_type": "LORA",')
    elif kind == "not_an_object":
        path.write_text("[]")
    else:
        config.update({"r_string": {"r": "sixteen"}, "base_gone": {"base_model_name_or_path": str(tmp_path / "gone")},
                       "relative_base_nowhere": {"base_model_name_or_path": "demo_run/moe"}}[kind])
        path.write_text(json.dumps(config))
    _fails(capsys, ["merge", adapter, tmp_path / "merged"], *needles)
    assert not (tmp_path / "merged").exists()


# --------------------------------------------------------------------------------------------- evaluate
def _evaluate(model, valid, *extra) -> list[str]:
    return ["evaluate", str(model), "--validation_file", str(valid), "--block_size", "32", "--max_eval_samples", "2",
            *map(str, extra)]


def test_evaluate_missing_model_folder_in_a_real_process(text, tmp_path):
    _fails_in_a_process(_evaluate(tmp_path / "no_such_model", text[1]), "does not exist")


def test_evaluate_bad_batch_size_and_empty_file(small_models, text, tmp_path, capsys):
    _, moe = small_models
    _fails(capsys, _evaluate(moe, text[1], "--batch_size", "0"), "batch_size=0 is invalid")
    (tmp_path / "empty.txt").write_text("")
    _fails(capsys, _evaluate(moe, tmp_path / "empty.txt"), "--validation_file", "is empty")


def test_evaluate_checks_output_json_before_evaluating(small_models, text, tmp_path, capsys, monkeypatch):
    """Item 10: --output_json into a missing folder (or onto an input) fails before the model is even loaded."""
    _, moe = small_models
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    _fails(capsys, _evaluate(moe, text[1], "--output_json", tmp_path / "missing" / "eval.json"),
           "the folder", "does not exist")
    _fails(capsys, _evaluate(moe, text[1], "--output_json", text[1]), "is the input")
    assert not (tmp_path / "missing").exists()


def test_evaluate_corrupt_shard(small_models, text, tmp_path, capsys):
    _, moe = small_models
    model = shutil.copytree(moe, tmp_path / "moe")
    shard = next(model.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    _fails(capsys, _evaluate(model, text[1]), shard.name, "download or copy it again")
