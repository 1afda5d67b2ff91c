"""Converted models load with trust_remote_code=True in a process that cannot import moe_upcycle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_upcycle
from moe_upcycle.convert.verify import fixed_batch

from .families import FAMILIES, VOCAB, build_dense

CHILD = r"""
import json, sys
sys.modules["moe_upcycle"] = None  # importing it now raises ImportError
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
jobs = json.loads(sys.argv[1])
batch = load_file(sys.argv[2])
out = {}
for name, path in jobs.items():
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        out[name] = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.contiguous()
save_file(out, sys.argv[3])
"""


def assert_same_logits_without_package(folders: dict[str, Path], vocab_size: int, tmp_path: Path) -> None:
    """Each model folder (name -> folder) computes, loaded with trust_remote_code=True in a process that cannot import
    moe_upcycle, the very logits it computes with the package, on a batch with a left-padded row."""
    input_ids, attention_mask = fixed_batch(vocab_size, batch_size=2, seq_len=12)
    expected = {}
    for name, folder in folders.items():
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_upcycled_moe.UpcycledMoeForCausalLM"
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert type(model).__module__.startswith("moe_upcycle"), type(model).__module__
        with torch.no_grad():
            expected[name] = model(input_ids=input_ids, attention_mask=attention_mask).logits
    save_file({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "batch.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    jobs = json.dumps({name: str(folder) for name, folder in folders.items()})
    subprocess.run([sys.executable, "-c", CHILD, jobs, str(tmp_path / "batch.safetensors"), str(tmp_path / "out.safetensors")],
                   check=True, env=env, cwd=tmp_path)
    got = load_file(tmp_path / "out.safetensors")
    for name in folders:
        assert torch.equal(got[name], expected[name]), name


def test_trust_remote_code_without_package(tmp_path):
    folders = {}
    for family in FAMILIES:
        dense_dir = build_dense(family, tmp_path / family / "dense")
        folders[family] = tmp_path / family / "moe"
        moe_upcycle.upcycle(dense_dir, folders[family], num_experts=4, top_k=2, layers="0,1")
    assert_same_logits_without_package(folders, VOCAB, tmp_path)
