"""UpcycledMoeForCausalLM behaviour: losses, router precision, kernels, checkpointing, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import moe_upcycle
from moe_upcycle import UpcycledMoeConfig, UpcycledMoeForCausalLM
from moe_upcycle.modeling.moe_losses import load_balancing_loss, router_z_loss

from .families import build_dense


def _config(**overrides) -> UpcycledMoeConfig:
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=True)
    return UpcycledMoeConfig(text_config=text, **{"num_experts": 4, "num_experts_per_tok": 2, **overrides})


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"num_experts_per_tok": 5}, "num_experts_per_tok=5"),
        ({"moe_layers": [0, 2]}, "moe_layers=[2]"),
        ({"moe_layers": []}, "at least one"),
        ({"num_experts": 0}, "num_experts=0"),
        ({"expert_kind": "swiglu"}, "expert_kind='swiglu'"),
        ({"router_jitter_noise": 1.5}, "router_jitter_noise=1.5"),
    ],
)
def test_config_rejects_bad_values(overrides, needle):
    with pytest.raises(ValueError, match=None) as info:
        _config(**overrides)
    assert needle in str(info.value) and "expected" in str(info.value)


def test_loss_adds_weighted_aux_and_z_loss():
    torch.manual_seed(0)
    model = UpcycledMoeForCausalLM(_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.25)).eval()
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
    lm = model.model(input_ids=ids, attention_mask=mask, labels=ids).loss
    aux = torch.stack([load_balancing_loss(r, 2, mask) for r in out.router_logits]).mean()
    z = torch.stack([router_z_loss(r, mask) for r in out.router_logits]).mean()
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.loss, lm + 0.5 * aux + 0.25 * z)
    assert 0.9 < aux.item() < 2.0  # ~1 for near-uniform routing (its minimum is 1 when balanced)


def test_load_balancing_loss_is_one_when_balanced_and_ignores_padding():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 0.0, 5.0, 4.0]] * 4)
    loss = load_balancing_loss(logits, 2)
    probs = torch.softmax(logits, -1).mean(0)
    torch.testing.assert_close(loss, 4 * (0.25 * probs).sum())
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    skewed = logits.clone()
    skewed[6:] = torch.tensor([9.0, 9.0, 0.0, 0.0])
    torch.testing.assert_close(load_balancing_loss(skewed, 2, mask), load_balancing_loss(logits[:6], 2))


def test_router_runs_in_float32_under_bfloat16():
    torch.manual_seed(0)
    model = UpcycledMoeForCausalLM(_config()).to(torch.bfloat16).eval()
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    assert out.logits.dtype == torch.bfloat16
    assert all(r.dtype == torch.float32 for r in out.router_logits)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm", "sorted_mm"])
def test_experts_kernels_agree_with_the_default(implementation):
    """The default kernel (``sorted_mm`` on this CPU) gives every other kernel's logits."""
    torch.manual_seed(0)
    model = UpcycledMoeForCausalLM(_config()).eval()
    assert model.config._experts_implementation == "upcycled_default"
    assert model.config._attn_implementation == "sdpa"
    ids, mask = _batch()
    reference = model(input_ids=ids, attention_mask=mask).logits
    model.set_experts_implementation(implementation)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["grouped_mm", "sorted_mm", "eager"])
def test_from_pretrained_takes_an_experts_implementation(implementation, tmp_path):
    torch.manual_seed(0)
    UpcycledMoeForCausalLM(_config()).save_pretrained(tmp_path)
    default = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=implementation).eval()
    assert model.moe_blocks()[0].experts.config._experts_implementation == implementation
    ids, mask = _batch()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               default(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = UpcycledMoeForCausalLM(_config(router_aux_loss_coef=0.1))
    ids, mask = _batch()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.model.layers[0].gradient_checkpointing
        model.train()
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    router = "model.model.layers.0.mlp.gate.weight"
    assert grads[0][router].abs().sum() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4)


def test_aux_term_is_weighted_by_token_share_under_accumulation():
    """Two micro-batches of an accumulated batch add up to LM mean + token-weighted mean aux (not 2x aux)."""
    torch.manual_seed(0)
    model = UpcycledMoeForCausalLM(_config(router_aux_loss_coef=1.0, router_z_loss_coef=0.0)).eval()
    micro = [_batch(seed=1)[0], _batch(seed=2)[0][:1]]  # 30 and 15 label tokens
    counts = [int((ids[:, 1:] != -100).sum()) for ids in micro]
    total = sum(counts)
    summed = 0.0
    expected = 0.0
    for ids, count in zip(micro, counts, strict=True):
        out = model(input_ids=ids, labels=ids, num_items_in_batch=total)
        lm = model.model(input_ids=ids, labels=ids, num_items_in_batch=total).loss
        summed = summed + out.loss
        expected = expected + lm + count / total * out.aux_loss
    torch.testing.assert_close(summed, expected)
    assert counts == [30, 15]


def test_save_and_reload_keeps_weights_and_ties(tmp_path):
    torch.manual_seed(0)
    model = UpcycledMoeForCausalLM(_config(moe_layers=[1])).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_upcycled_moe.py").is_file() and (tmp_path / "moe_losses.py").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    ids, mask = _batch()
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)
    assert loaded.config.moe_layers == [1]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sorted_mm_kernel_matches_eager(family, tmp_path):
    """The ``sorted_mm`` experts kernel (the CPU default) gives eager's logits and gradients (distinct experts, with biases)."""
    build_dense(family, tmp_path / "dense")
    moe_upcycle.upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, expert_noise=0.1)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    results = {}
    for implementation in ("eager", "sorted_mm"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32)
        model.set_experts_implementation(implementation)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[implementation] = out.logits.detach(), grads
    assert (results["eager"][0] - results["sorted_mm"][0]).abs().max() <= 1e-5
    assert results["eager"][1].numel() == results["sorted_mm"][1].numel()
    assert (results["eager"][1] - results["sorted_mm"][1]).abs().max() <= 1e-5
