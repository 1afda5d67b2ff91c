"""Every fine-tuning recipe in configs/ runs through the command on its own first line (a few steps on the test model)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from moe_upcycle.cli import main

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
