"""Drop-Upcycling: the requested fraction of neurons per expert is re-initialised from the source statistics."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import moe_upcycle
from moe_upcycle.cli import main

from .families import build_dense


def _weights(folder):
    state = {}
    for shard in folder.glob("*.safetensors"):
        state.update(load_file(shard))
    return state


def test_drop_upcycling_reinitialises_exactly_the_requested_neurons(tmp_path):
    dense_dir = build_dense("llama", tmp_path / "dense", intermediate_size=64, hidden_size=48, num_attention_heads=4)
    moe_upcycle.upcycle(dense_dir, tmp_path / "moe", num_experts=4, top_k=2, drop_upcycling_ratio=0.5, seed=3)
    dense, moe = _weights(dense_dir), _weights(tmp_path / "moe")
    gate, up, down = (dense[f"model.layers.0.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    gate_up = moe["model.model.layers.0.mlp.experts.gate_up_proj"]  # [E, 2I, H]
    experts_down = moe["model.model.layers.0.mlp.experts.down_proj"]  # [E, H, I]
    intermediate = gate.shape[0]
    changed_sets = []
    for e in range(4):
        kept_gate = (gate_up[e, :intermediate] == gate).all(dim=1)
        kept_up = (gate_up[e, intermediate:] == up).all(dim=1)
        kept_down = (experts_down[e] == down).all(dim=0)
        assert torch.equal(kept_gate, kept_up) and torch.equal(kept_gate, kept_down), "same neurons in every tensor"
        changed = (~kept_gate).nonzero().flatten()
        assert changed.numel() == intermediate // 2
        changed_sets.append(set(changed.tolist()))
        fresh = gate_up[e, :intermediate][changed]
        assert fresh.mean().item() == pytest.approx(gate.mean().item(), abs=3 * gate.std().item() / fresh.numel() ** 0.5)
        assert fresh.std().item() == pytest.approx(gate.std().item(), rel=0.1)
        fresh_down = experts_down[e][:, changed]
        assert fresh_down.std().item() == pytest.approx(down.std().item(), rel=0.1)
    assert len({frozenset(s) for s in changed_sets}) == 4, "experts differ from each other"


def test_verify_reports_the_difference_instead_of_failing(tmp_path, capsys):
    dense_dir = build_dense("qwen2", tmp_path / "dense")
    assert main(["convert", str(dense_dir), str(tmp_path / "moe"), "--num-experts", "4", "--drop-upcycling", "0.5",
                 "--verify"]) == 0
    out = capsys.readouterr().out
    assert "not expected to be exact: drop_upcycling_ratio=0.5" in out
    assert main(["convert", str(dense_dir), str(tmp_path / "bad"), "--drop-upcycling", "1.0"]) == 2
    assert "drop_upcycling_ratio=1.0" in capsys.readouterr().err
