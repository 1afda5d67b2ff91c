"""Converted models load with trust_remote_code=True in a process that cannot import moe_upcycle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


def test_trust_remote_code_without_package(tmp_path):
    jobs, expected = {}, {}
    input_ids, attention_mask = fixed_batch(VOCAB, batch_size=2, seq_len=12)
    for family in FAMILIES:
        dense_dir = build_dense(family, tmp_path / family / "dense")
        moe_dir = tmp_path / family / "moe"
        moe_upcycle.upcycle(dense_dir, moe_dir, num_experts=4, top_k=2, layers="0,1")
        config = json.loads((moe_dir / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_upcycled_moe.UpcycledMoeForCausalLM"
        model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            expected[family] = model(input_ids=input_ids, attention_mask=attention_mask).logits
        jobs[family] = str(moe_dir)
    save_file({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "batch.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(jobs), str(tmp_path / "batch.safetensors"), str(tmp_path / "out.safetensors")],
        check=True, env=env, cwd=tmp_path,
    )
    got = load_file(tmp_path / "out.safetensors")
    for family in FAMILIES:
        assert torch.equal(got[family], expected[family]), family
