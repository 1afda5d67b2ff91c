"""Every fine-tuning recipe and the mix example in configs/ run through the command on their own first line (a few steps
on the test model)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from moe_upcycle.cli import main

from .families import build_branch

CONFIGS = Path(__file__).parents[1] / "configs"
FINETUNE_FILES = sorted(CONFIGS.glob("finetune_*.yaml"))
# Short and small: every other setting (bf16, checkpointing, schedules, strategies) stays the recipe's own.
SHORT = ["--max_steps", "2", "--block_size", "32", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
         "1", "--eval_steps", "1", "--save_steps", "2", "--logging_steps", "1", "--max_train_samples", "8",
         "--max_eval_samples", "4", "--report_to", "none"]


def first_line_command(path: Path) -> list[str]:
    line = path.read_text().splitlines()[0]
    assert line.startswith("# moe-upcycle train --config "), line
    return shlex.split(line.removeprefix("# moe-upcycle "))


def test_every_finetune_recipe_is_tested():
    assert {p.name for p in FINETUNE_FILES} == {"finetune_demo_lora.yaml", "finetune_full.yaml", "finetune_router_only.yaml"}


@pytest.mark.parametrize("recipe", FINETUNE_FILES, ids=lambda p: p.stem)
def test_finetune_recipe_runs_as_its_first_line_says(recipe, small_models, docs_files, tmp_path, monkeypatch):
    _, moe = small_models
    train, valid = docs_files
    monkeypatch.chdir(Path(__file__).parents[1])  # the commands name configs/... relative to the repository
    places = {"MOE_DIR": str(moe), "TRAIN": str(train), "OUT": str(tmp_path / "out")}
    argv = [places.get(word, word) for word in first_line_command(recipe)]
    # The demo recipe names demo_run/ paths: point them at the test model and data instead.
    argv += ["--model_name_or_path", str(moe), "--train_file", str(train), "--validation_file", str(valid),
             "--output_dir", str(tmp_path / "out"), *SHORT]
    assert main(argv) == 0
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_mix_example_runs_as_its_first_line_says(small_models, tmp_path, monkeypatch):
    """configs/mix_btx_example.yaml, its demo_run/ sources replaced by the test's small Llama and two branches of it."""
    recipe_file = CONFIGS / "mix_btx_example.yaml"
    line = recipe_file.read_text().splitlines()[0]
    assert line.startswith("# moe-upcycle mix configs/mix_btx_example.yaml "), line
    dense, _ = small_models
    recipe = yaml.safe_load(recipe_file.read_text())
    places = {"demo_run/dense": dense}
    for expert in recipe["experts"]:
        name = expert["source_model"]
        places.setdefault(name, build_branch(dense, tmp_path / Path(name).name, seed=len(places)))
        expert["source_model"] = str(places[name])
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / recipe_file.name).write_text(yaml.safe_dump(recipe, sort_keys=False))
    monkeypatch.chdir(tmp_path)  # the command names configs/... and demo_run/... relative to where it runs
    assert main(shlex.split(line.removeprefix("# moe-upcycle "))) == 0
    config = json.loads((tmp_path / "demo_run" / "btx-moe" / "config.json").read_text())
    assert config["num_experts"] == 3 and config["upcycling"]["nonexpert"] == "average"
