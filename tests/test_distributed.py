"""The training recipe under `accelerate launch` with 2 CPU processes (gloo DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from moe_upcycle.train.args import DataArguments
from moe_upcycle.train.data import load_raw, pack

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"


def test_two_process_cpu_training_writes_one_set_of_outputs(small_models, docs_files, tmp_path):
    _, moe = small_models
    train, valid = docs_files
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
           "--model_name_or_path", str(moe), "--train_file", str(train), "--validation_file", str(valid),
           "--output_dir", str(out), "--block_size", "64", "--use_lora", "--max_steps", "3",
           "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
           "--save_strategy", "no", "--max_eval_samples", "16", "--disable_tqdm", "true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # One DDP group: each step consumes 2 processes x 4 blocks of the training set.
    tokenizer = AutoTokenizer.from_pretrained(moe)
    data = DataArguments(train_file=str(train), validation_file=str(valid), block_size=64)
    num_blocks = len(pack(load_raw(data), tokenizer, data)["train"])
    # (epoch counts whole per-process batches, hence the tolerance; one process alone would give 12)
    assert state["log_history"][-1]["epoch"] * num_blocks == pytest.approx(3 * 2 * 4, rel=0.05)
    train_logs = [h for h in state["log_history"] if "loss" in h]
    assert len(train_logs) == 3 and all("moe/aux_loss" in h for h in train_logs)
    assert (out / "adapter_model.safetensors").is_file() and (out / "eval_results.json").is_file()
    assert (out / "expert_load.png").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == []
    assert "ParallelMode.DISTRIBUTED" not in proc.stderr  # the processes formed one DDP group
