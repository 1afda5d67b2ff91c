"""Every subcommand on the three folders users most often hand it by mistake: a fully fine-tuned dense model without a
README, a config.json that is not valid JSON, and a config of a model type Transformers does not know. Each run ends
with exit status 0, or 2 and one ``moe-upcycle: error:`` line; never a traceback (``hostile.failure_problems``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moe_upcycle.commands import COMMANDS

from .hostile import failure_problems, run_inprocess, success_problems


def _mix_recipe(folder: Path, out: Path) -> Path:
    recipe = out.parent / "mix.yaml"
    recipe.write_text(f"gate_mode: random\nexperts:\n  - source_model: {folder}\n  - source_model: {folder}\n")
    return recipe


def _argv(command: str, folder: Path, out: Path, data: Path) -> list:
    return {
        "mix": ["mix", _mix_recipe(folder, out), out, "--allow-identical-sources"],
        "convert": ["convert", folder, out, "--num-experts", "4", "--top-k", "2"],
        "export": ["export", folder, out],
        "materialize": ["materialize", folder, out],
        "shrink": ["shrink", folder, out, "--num-experts", "1", "--data", data, "--block-size", "32"],
        "quantize": ["quantize", folder, out, "--experts", "int8"],
        "merge": ["merge", folder, out],
        "evaluate": ["evaluate", folder, "--validation_file", data, "--block_size", "32", "--max_eval_samples", "2"],
        "push": ["push", folder, "someone/model", "--dry-run"],
        "analyze": ["analyze", folder, "--data", f"docs={data}", "--output", out],
        "train": ["train", "--model_name_or_path", folder, "--train_file", data, "--output_dir", out, "--max_steps", "1",
                  "--block_size", "32", "--per_device_train_batch_size", "2", "--report_to", "none",
                  "--save_strategy", "no", "--disable_tqdm", "true"],
    }[command]


FOLDER_COMMANDS = [c.add.__module__.rpartition(".")[2] for c in COMMANDS]
FOLDER_COMMANDS.remove("demo")  # takes no folder


def test_every_subcommand_is_covered(tmp_path):
    for command in FOLDER_COMMANDS:
        _argv(command, tmp_path / "f", tmp_path / "o", tmp_path / "d")  # a KeyError names a subcommand without a row here


@pytest.fixture(scope="module")
def folders(small_models, docs_files, tmp_path_factory) -> dict[str, Path]:
    """The three folders, each a copy of the small dense model."""
    dense, _ = small_models
    root = tmp_path_factory.mktemp("everyday")
    made = {}
    for name in ("dense_finetuned_no_readme", "config_invalid_json", "config_unknown_model_type"):
        made[name] = root / name
        shutil.copytree(dense, made[name])
        (made[name] / "README.md").unlink(missing_ok=True)
    # What `moe-upcycle train` leaves in a fully fine-tuned folder (its records), without the card.
    (made["dense_finetuned_no_readme"] / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (made["dense_finetuned_no_readme"] / "training_recipe.json").write_text(json.dumps({"moe": {}, "data": {}}))
    (made["config_invalid_json"] / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    config = json.loads((made["config_unknown_model_type"] / "config.json").read_text())
    (made["config_unknown_model_type"] / "config.json").write_text(json.dumps({**config, "model_type": "no_such_family"}))
    return made


@pytest.mark.parametrize("case", ["dense_finetuned_no_readme", "config_invalid_json", "config_unknown_model_type"])
@pytest.mark.parametrize("command", FOLDER_COMMANDS)
def test_everyday_folder(command, case, folders, docs_files, tmp_path, capfd):
    outcome = run_inprocess(_argv(command, folders[case], tmp_path / "out", docs_files[1]), capfd)
    broken_config = case != "dense_finetuned_no_readme"
    needs_moe = ("push", "merge", "export", "analyze", "materialize", "shrink", "quantize")  # a MoE model (or an adapter)
    refused = broken_config or command in needs_moe
    if refused:
        assert not failure_problems(outcome), outcome.describe()
        assert outcome.code == 2, outcome.describe()
    else:
        assert not success_problems(outcome), outcome.describe()
    assert not (folders[case] / "README.md").exists(), "a failed or dry run leaves no card behind"
