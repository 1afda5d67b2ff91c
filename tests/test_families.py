"""Every supported family converts into a MoE model that computes exactly what the dense model did."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_upcycle
from moe_upcycle.convert.verify import fixed_batch
from moe_upcycle.modeling.moe_losses import expert_load

from .families import FAMILIES, VOCAB, build_dense

TOL = 1e-5


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _assert_same_function(dense, moe):
    input_ids, attention_mask = fixed_batch(VOCAB, batch_size=3, seq_len=20)
    with torch.no_grad():
        a = dense(input_ids=input_ids, attention_mask=attention_mask).logits
        b = moe(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (a[real] - b[real]).abs().max().item() <= TOL
    prompt = input_ids[:1, :6]
    g_dense = dense.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    g_moe = moe.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert g_dense.shape[1] == 26
    assert torch.equal(g_dense, g_moe)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_upcycles_exactly(family, tmp_path):
    dense_dir = build_dense(family, tmp_path / "dense")
    assert len(list(dense_dir.glob("*.safetensors"))) > 1, "the source checkpoint should be sharded"
    result = moe_upcycle.upcycle(dense_dir, tmp_path / "moe", num_experts=4, top_k=2, max_shard_size="60KB")
    assert len(result.shards) > 1 and (tmp_path / "moe" / "model.safetensors.index.json").is_file()
    dense, moe = _load(dense_dir), _load(tmp_path / "moe")
    assert type(moe).__name__ == "UpcycledMoeForCausalLM"
    assert len(moe.moe_blocks()) == dense.config.num_hidden_layers
    if dense.config.tie_word_embeddings:
        out, emb = moe.get_output_embeddings().weight, moe.get_input_embeddings().weight
        assert out.data_ptr() == emb.data_ptr(), "tied embeddings must stay tied"
    _assert_same_function(dense, moe)

    # With the small random router every expert of every layer receives tokens.
    input_ids, attention_mask = fixed_batch(VOCAB, batch_size=4, seq_len=32, seed=1)
    with torch.no_grad():
        router_logits = moe(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True).router_logits
    assert len(router_logits) == dense.config.num_hidden_layers
    for logits in router_logits:
        assert logits.shape == (input_ids.numel(), 4) and logits.dtype == torch.float32
        assert (expert_load(logits, 2, attention_mask) > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_partial_layers(family, tmp_path):
    dense_dir = build_dense(family, tmp_path / "dense", seed=1)
    moe_upcycle.upcycle(dense_dir, tmp_path / "moe", num_experts=4, top_k=2, layers="0,2")
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["moe_layers"] == [0, 2]
    dense, moe = _load(dense_dir), _load(tmp_path / "moe")
    assert len(moe.moe_blocks()) == 2
    layers = moe.model.get_decoder().layers if hasattr(moe.model.get_decoder(), "layers") else moe.model.transformer.h
    assert type(getattr(layers[1], moe.config.mlp_module_name)).__name__ != "UpcycledSparseMoeBlock"
    _assert_same_function(dense, moe)


def test_llama_with_mlp_bias_uses_biased_experts(tmp_path):
    dense_dir = build_dense("llama", tmp_path / "dense", mlp_bias=True, attention_bias=True)
    moe_upcycle.upcycle(dense_dir, tmp_path / "moe", num_experts=4, top_k=2)
    dense, moe = _load(dense_dir), _load(tmp_path / "moe")
    assert type(moe.moe_blocks()[0].experts).__name__ == "UpcycledGluBiasExperts"
    _assert_same_function(dense, moe)
