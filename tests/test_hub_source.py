"""A Hub model id resolves through huggingface_hub (here from a populated cache, offline)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_upcycle
from moe_upcycle.errors import SourceNotFoundError
from moe_upcycle.hub import resolve_source

from .families import build_dense


def _populate_cache(cache, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay out ``folder`` as huggingface_hub's cache of ``repo_id`` at revision main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_hub_id_resolves_offline_from_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    dense = build_dense("qwen2", tmp_path / "dense")
    _populate_cache(cache, "org/tiny-qwen2", dense)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    folder = resolve_source("org/tiny-qwen2")
    assert folder.parent.parent.name == "models--org--tiny-qwen2" and (folder / "config.json").is_file()
    result = moe_upcycle.upcycle("org/tiny-qwen2", tmp_path / "moe", num_experts=4, top_k=1, verify=True)
    assert result.max_logit_diff is not None and result.max_logit_diff <= 1e-5
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).config
    assert config.upcycling["source"] == "org/tiny-qwen2" and config.upcycling["top_k"] == 1

    with pytest.raises(SourceNotFoundError, match="could not be downloaded"):
        resolve_source("org/not-cached")
