"""Quantised experts (issue 16, the runtime): the int8 / int4 schemes' error bound and storage, the group-size
refusals, the ``quantized`` kernel against the eager reference (outputs, gradients, which experts it dequantises), and
whole models: equal to the float model holding the dequantised experts, saved and reloaded with their integer
tensors intact (with and without the package)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import moe_upcycle
from moe_upcycle.convert.verify import fixed_batch
from moe_upcycle.modeling.configuration_upcycled_moe import UpcycledMoeConfig
from moe_upcycle.modeling.modeling_upcycled_moe import UpcycledGluExperts, UpcycledMlpExperts
from moe_upcycle.modeling.quantized_experts import (
    FLOAT,
    PRECISIONS,
    QUANT_SCHEMES,
    UpcycledQuantizedExperts,
    check_group_size,
    expert_slots,
    quantize_experts,
    quantized_experts_forward,
)

from .families import VOCAB, build_dense
from .test_remote_code import assert_same_logits_without_package

GROUP = 16
MIXED = ["int8", "int4", FLOAT, "int4", "int8"]  # five experts, every precision, two slots of the integer ones


# -- the schemes ------------------------------------------------------------------------------------------------

def _adversarial(out: int, in_features: int) -> torch.Tensor:
    """Rows that stress absmax quantisation: zeros, one huge outlier, denormal-small values, exact half steps."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out, in_features, generator=g)
    w[0] = 0.0  # a zero row (every group of it is zero)
    w[1, 5] = 1e6  # an outlier that makes the rest of its row (and group) round to zero
    w[2] *= 1e-30
    w[3, :GROUP] = 0.0  # one zero group in a non-zero row
    w[4] = torch.arange(in_features) % 8 - 3.5  # values on half steps of the int4 scale of their group
    w[5] = -w[5].abs()  # a row of one sign
    return w


def _element_scale(name: str, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """The scale of every element: scale [..., out, groups] -> [..., out, in]."""
    return scale.repeat_interleave(in_features // scale.shape[-1], dim=-1)


@pytest.mark.parametrize("name", list(QUANT_SCHEMES))
@pytest.mark.parametrize("kind", ["random", "adversarial", "stacked"])
def test_every_element_is_within_half_its_scale(name, kind):
    out, in_features = 24, 64
    if kind == "random":
        weight = torch.randn(out, in_features, generator=torch.Generator().manual_seed(0)) * 0.02
    elif kind == "adversarial":
        weight = _adversarial(out, in_features)
    else:  # [n, out, in], as the experts of one layer
        weight = torch.randn(3, out, in_features, generator=torch.Generator().manual_seed(1))
    scheme = QUANT_SCHEMES[name]
    codes, scale = scheme.quantize(weight, GROUP)
    assert scale.dtype == torch.float32 and torch.isfinite(scale).all() and (scale > 0).all()
    restored = scheme.dequantize(codes, scale, GROUP, torch.float32)
    assert restored.shape == weight.shape and torch.isfinite(restored).all()
    error = (weight.double() - restored.double()).abs()
    # Half the scale, up to float32 rounding of w / scale and of q * scale (relative 2^-24 on codes <= 127).
    bound = _element_scale(name, scale, in_features).double() * (0.5 + 1e-5)
    assert (error <= bound).all(), (error / bound).max()
    if kind == "adversarial":
        assert torch.equal(restored[0], torch.zeros(in_features))  # zero rows and groups are exact, never NaN
        assert torch.equal(restored[3, :GROUP], torch.zeros(GROUP))
        assert restored[1, 5] == pytest.approx(1e6, rel=1e-6)  # the outlier is a code's maximum: exact up to rounding


def test_codes_stay_in_range_and_int4_packs_two_per_byte():
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    int8, _ = QUANT_SCHEMES["int8"].quantize(weight, GROUP)
    assert int8.dtype == torch.int8 and int8.abs().max() <= 127 and int8.abs().max() == 127
    packed, scale = QUANT_SCHEMES["int4"].quantize(weight, GROUP)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 16) and scale.shape == (8, 32 // GROUP)
    low, high = (packed & 0x0F).long() - 8, (packed >> 4).long() - 8  # columns 2j (low nibble) and 2j + 1
    codes = torch.round(weight / scale.repeat_interleave(GROUP, dim=-1)).long()
    assert torch.equal(low, codes[:, 0::2]) and torch.equal(high, codes[:, 1::2])
    assert low.abs().max() <= 7 and high.abs().max() <= 7


def test_int2_packs_four_per_byte():
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    packed, scale = QUANT_SCHEMES["int2"].quantize(weight, GROUP)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 8) and scale.shape == (8, 32 // GROUP)
    codes = torch.round(weight / scale.repeat_interleave(GROUP, dim=-1)).long()
    for i in range(4):  # column 4j + i in bits 2i, 2i + 1, offset by 2
        assert torch.equal(((packed >> (2 * i)) & 3).long() - 2, codes[:, i::4])
    assert codes.abs().max() <= 1
    with pytest.raises(ValueError, match="multiple of 4"):
        QUANT_SCHEMES["int2"].quantize(torch.randn(4, 6), 2)


@pytest.mark.parametrize(("name", "codes_bytes", "scales"), [("int8", 48 * 64, 48), ("int4", 48 * 64 // 2, 48 * 64 // GROUP),
                                                             ("int2", 48 * 64 // 4, 48 * 64 // GROUP)])
def test_storage_size_is_the_theoretical_size(name, codes_bytes, scales):
    scheme = QUANT_SCHEMES[name]
    codes, scale = scheme.quantize(torch.randn(48, 64), GROUP)
    assert codes.numel() * codes.element_size() == codes_bytes and scale.numel() == scales
    assert scheme.storage_shapes(48, 64, GROUP) == (tuple(codes.shape), tuple(scale.shape))
    meta_codes, meta_scale = scheme.storage(48, 64, GROUP)
    assert (meta_codes.dtype, meta_codes.shape, meta_scale.dtype, meta_scale.shape) == \
        (codes.dtype, codes.shape, scale.dtype, scale.shape)
    assert scheme.logical_shape(codes.shape, scale.shape, GROUP) == (48, 64)


@pytest.mark.parametrize(("in_features", "group_size", "words"), [
    (48, 64, "does not divide the input dimension 48"), (48, 32, "does not divide the input dimension 48"),
    (48, 3, "even integer"), (48, 0, "even integer"), (48, -16, "even integer"), (48, True, "even integer"),
    (48, 16.0, "even integer"),
])
def test_group_sizes_that_do_not_fit_are_refused(in_features, group_size, words):
    assert words in check_group_size(in_features, group_size)
    with pytest.raises(ValueError, match=words):
        QUANT_SCHEMES["int4"].quantize(torch.randn(4, in_features), group_size)
    assert check_group_size(in_features, 16) is None and check_group_size(None, 16) is None


def test_int8_ignores_the_group_size_and_non_finite_weights_are_refused():
    weight = torch.randn(4, 48)
    assert QUANT_SCHEMES["int8"].quantize(weight, 64)[1].shape == (4, 1)
    weight[1, 2] = float("nan")
    for scheme in QUANT_SCHEMES.values():
        with pytest.raises(ValueError, match="NaN"):
            scheme.quantize(weight, GROUP)


def test_slots_and_stored_tensors_follow_the_experts_order():
    assert expert_slots(MIXED) == [("int8", 0), ("int4", 0), (FLOAT, 0), ("int4", 1), ("int8", 1)]
    weight = torch.randn(5, 32, 48)
    stored = quantize_experts("down_proj", weight, MIXED, GROUP)
    assert {name: tuple(t.shape) for name, t in stored.items()} == {
        "down_proj_int8": (2, 32, 48), "down_proj_int8_scale": (2, 32, 1), "down_proj_int4": (2, 32, 24),
        "down_proj_int4_scale": (2, 32, 3), "down_proj": (1, 32, 48)}
    assert torch.equal(stored["down_proj"][0], weight[2])
    assert torch.equal(stored["down_proj_int4"][1], QUANT_SCHEMES["int4"].quantize(weight[3], GROUP)[0])
    with pytest.raises(ValueError, match="unknown precisions"):
        quantize_experts("down_proj", weight, ["int8", "int3", FLOAT, FLOAT, FLOAT], GROUP)


# -- the config --------------------------------------------------------------------------------------------------

def _config(precision=None, **options) -> UpcycledMoeConfig:
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)
    options = {"expert_group_size": GROUP, **options}
    return UpcycledMoeConfig(text_config=text, num_experts=len(MIXED), num_experts_per_tok=2, expert_precision=precision,
                             **options)


@pytest.mark.parametrize(("options", "words"), [
    (dict(precision={"2": MIXED}), "keys among the MoE layers"),
    (dict(precision={1: MIXED}), "keys among the MoE layers"),
    (dict(precision={"1": MIXED[:4]}), "expert_precision['1']"),
    (dict(precision={"1": ["int8", "int3", FLOAT, FLOAT, FLOAT]}), "names from"),
    (dict(precision={}), "non-empty dict"),
    (dict(precision={"1": MIXED}, expert_group_size=32), "does not divide the input dimension 48"),
    (dict(expert_group_size=7), "expert_group_size=7"),
    (dict(precision={"1": MIXED}, expert_sharing="lora", expert_lora_rank=2, expert_lora_alpha=4.0,
          expert_lora_targets=["up"]), "expert_sharing='lora'"),
])
def test_config_refuses_bad_precisions(options, words):
    with pytest.raises(ValueError, match="UpcycledMoeConfig") as error:
        _config(**options)
    assert words in str(error.value)


def test_config_allows_int8_with_any_even_group_size():
    config = _config({"1": ["int8", FLOAT, "int8", FLOAT, "int8"]}, expert_group_size=256)
    assert config.expert_precision_of(1) == ["int8", FLOAT, "int8", FLOAT, "int8"]
    assert config.expert_precision_of(0) is None and set(PRECISIONS) == {"int8", "int4", "int2", FLOAT}


# -- one layer: the kernel against the reference -----------------------------------------------------------------

def _experts(kind: str, seed: int = 0) -> UpcycledQuantizedExperts:
    """Layer 1 of ``_config`` with ``MIXED`` precisions (``glu``: gated, no biases; ``mlp``: plain, with biases),
    filled from random float weights."""
    config = _config({"1": MIXED}, expert_kind=kind, expert_bias=kind == "mlp")
    config._experts_implementation = "upcycled_default"
    experts = UpcycledQuantizedExperts(config, ACT2FN["silu" if kind == "glu" else "gelu_new"], layer=1)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out, in_features) in experts.shapes.items():
        state |= quantize_experts(name, torch.randn(len(MIXED), out, in_features, generator=g) * 0.2, MIXED, GROUP)
        if experts.has_bias:
            state[f"{name}_bias"] = torch.randn(len(MIXED), out, generator=g) * 0.1
    experts.load_state_dict(state, strict=True)
    return experts


def _routing(tokens: int = 40, used: tuple[int, ...] = (0, 1, 2, 3), seed: int = 1):
    """hidden [T, H], top_k_index [T, 2] over the experts ``used`` (the others get no token), weights [T, 2]."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(used)
    index = torch.stack([pool[torch.randperm(len(used), generator=g)[:2]] for _ in range(tokens)])
    return torch.randn(tokens, 32, generator=g), index, torch.softmax(torch.randn(tokens, 2, generator=g), dim=-1)


def _run(fn, experts, hidden, index, weights):
    """Output and the gradients of a fixed projection of it: hidden, weights and every trainable tensor."""
    hidden, weights = hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    experts.zero_grad()
    out = fn(hidden, index, weights)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {"hidden": hidden.grad, "weights": weights.grad}
    grads |= {name: p.grad for name, p in experts.named_parameters()}
    return out.detach(), grads


@pytest.mark.parametrize("kind", ["glu", "mlp"])
def test_kernel_equals_the_reference(kind):
    experts = _experts(kind)
    inputs = _routing()
    fast, fast_grads = _run(lambda *a: quantized_experts_forward(experts, *a), experts, *inputs)
    ref, ref_grads = _run(experts.reference, experts, *inputs)
    assert (fast - ref).abs().max() <= 1e-6 and ref.abs().max() > 0.1
    for name, grad in ref_grads.items():
        assert grad is not None and fast_grads[name] is not None, name
        assert torch.allclose(fast_grads[name], grad, atol=1e-5, rtol=1e-5), name
    assert fast_grads[next(iter(experts.shapes))].abs().sum() > 0  # the float expert's own weight trains


@pytest.mark.parametrize("implementation", ["eager", "upcycled_default", "quantized"])
def test_forward_dispatches_on_the_configured_kernel(implementation, monkeypatch):
    experts = _experts("glu")
    experts.config._experts_implementation = implementation
    calls = []
    monkeypatch.setattr(UpcycledQuantizedExperts, "reference", lambda self, *a: calls.append("reference") or a[0])
    experts(*_routing())
    assert calls == (["reference"] if implementation == "eager" else [])
    assert ALL_EXPERTS_FUNCTIONS["quantized"] is quantized_experts_forward


def test_kernel_dequantises_only_the_selected_experts_one_at_a_time(monkeypatch):
    experts = _experts("glu")
    seen = []
    weight = UpcycledQuantizedExperts.weight

    def counted(self, name, expert, dtype, rows=slice(None)):
        result = weight(self, name, expert, dtype, rows)
        seen.append((name, expert, tuple(result.shape)))
        return result

    monkeypatch.setattr(UpcycledQuantizedExperts, "weight", counted)
    hidden, index, weights = _routing(used=(0, 3))  # int8 slot 0 and int4 slot 1
    with torch.no_grad():
        quantized_experts_forward(experts, hidden, index, weights)
    assert sorted(seen) == [("down_proj", 0, (32, 48)), ("down_proj", 3, (32, 48)),
                            ("gate_up_proj", 0, (96, 32)), ("gate_up_proj", 3, (96, 32))]
    seen.clear()
    hidden.requires_grad_(True)
    quantized_experts_forward(experts, hidden, index, weights).sum().backward()
    # dequantised again in the backward pass (instead of kept by autograd), still only the selected experts
    assert sorted({e for _, e, _ in seen}) == [0, 3] and len(seen) == 8


def test_kernel_dequantises_blocks_of_rows_of_large_projections(monkeypatch):
    """With a block of 512 weights, each [96, 32] / [32, 48] projection is dequantised 16 / 10 rows at a time: the
    result and the gradients are the reference's."""
    import moe_upcycle.modeling.quantized_experts as module

    experts = _experts("glu")
    hidden, index, weights = _routing(used=(0, 1, 2, 3, 4))
    hidden.requires_grad_(True)
    whole = quantized_experts_forward(experts, hidden, index, weights)
    (grad_whole,) = torch.autograd.grad(whole.pow(2).sum(), hidden)
    monkeypatch.setattr(module, "BLOCK_ELEMENTS", 512)
    assert [s.stop for s in module._row_blocks(96, 32)] == [16, 32, 48, 64, 80, 96]
    blocked = quantized_experts_forward(experts, hidden, index, weights)
    (grad_blocked,) = torch.autograd.grad(blocked.pow(2).sum(), hidden)
    scale = grad_whole.abs().max()  # the gradient sums the blocks in another order: relative float32 rounding
    assert (blocked - whole).abs().max() < 1e-6 and (grad_blocked - grad_whole).abs().max() < 1e-6 * scale, scale


def test_gradient_reaches_the_hidden_states_and_never_the_integer_tensors():
    experts = _experts("mlp")
    hidden, index, weights = _routing(used=(0, 1, 2, 3, 4))
    hidden.requires_grad_(True)
    quantized_experts_forward(experts, hidden, index, weights).pow(2).sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0
    integer = {name for name, t in experts.named_buffers() if not t.is_floating_point()}
    assert integer == {"up_proj_int8", "up_proj_int4", "down_proj_int8", "down_proj_int4"}
    assert all(t.grad is None and not t.requires_grad for t in experts.buffers())
    assert {name for name, _ in experts.named_parameters()} == {"up_proj", "down_proj", "up_proj_bias", "down_proj_bias"}
    assert experts.up_proj.grad.abs().sum() > 0  # the float expert stays trainable


def test_no_tokens_gives_zeros():
    experts = _experts("glu")
    out = quantized_experts_forward(experts, torch.randn(0, 32), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, 32)


def test_dequantized_layer_is_every_experts_weight():
    experts = _experts("glu")
    layer = experts.dequantized("gate_up_proj")
    assert layer.shape == (5, 96, 32) and layer.dtype == torch.float32
    assert torch.equal(layer[2], experts.gate_up_proj[0])
    assert torch.equal(layer[4], QUANT_SCHEMES["int8"].dequantize(experts.gate_up_proj_int8[1],
                                                                  experts.gate_up_proj_int8_scale[1], GROUP, torch.float32))


# -- whole models ------------------------------------------------------------------------------------------------

PRECISION = {"0": ["int4", "int8", "int8", FLOAT], "1": ["int8", "int4", FLOAT, "int4"]}  # layer 2 stays float


def _float_model(family: str, tmp_path) -> moe_upcycle.UpcycledMoeForCausalLM:
    """A tiny upcycled model of ``family`` (3 layers, 4 experts) whose experts were made different by noise."""
    moe_upcycle.upcycle(build_dense(family, tmp_path / "dense"), tmp_path / "moe", num_experts=4, top_k=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
    return model


def _quantised(model) -> tuple[moe_upcycle.UpcycledMoeForCausalLM, moe_upcycle.UpcycledMoeForCausalLM]:
    """(the model with the experts of ``PRECISION``'s layers quantised, the float model holding their dequantised values)."""
    config = UpcycledMoeConfig.from_dict({**model.config.to_dict(), "expert_precision": PRECISION,
                                          "expert_group_size": GROUP})
    quantised = moe_upcycle.UpcycledMoeForCausalLM(config).eval()
    state = model.state_dict()
    for block, layer in zip(quantised.moe_blocks(), config.moe_layers, strict=True):
        experts = block.experts
        if not isinstance(experts, UpcycledQuantizedExperts):
            continue
        prefix = next(n for n, m in quantised.named_modules() if m is experts) + "."
        for name in experts.shapes:
            stored = quantize_experts(name, state.pop(prefix + name), PRECISION[str(layer)], GROUP)
            state |= {prefix + key: value for key, value in stored.items()}
    quantised.load_state_dict(state, strict=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for block, twin_block in zip(quantised.moe_blocks(), twin.moe_blocks(), strict=True):
            if isinstance(block.experts, UpcycledQuantizedExperts):
                for name in block.experts.shapes:
                    getattr(twin_block.experts, name).copy_(block.experts.dequantized(name))
    return quantised, twin


def _logits(model, implementation: str = "upcycled_default") -> torch.Tensor:
    model.config._experts_implementation = implementation
    input_ids, attention_mask = fixed_batch(VOCAB, batch_size=2, seq_len=16)  # the second row is left-padded
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize(("family", "float_class"), [("llama", UpcycledGluExperts), ("gpt2", UpcycledMlpExperts)])
def test_equals_the_float_model_with_the_dequantised_experts(family, float_class, tmp_path):
    model = _float_model(family, tmp_path)
    quantised, twin = _quantised(model)
    kinds = [type(block.experts) for block in quantised.moe_blocks()]
    assert kinds == [UpcycledQuantizedExperts, UpcycledQuantizedExperts, float_class]
    assert all(type(block.experts) is float_class for block in twin.moe_blocks())
    expected = _logits(twin)
    for implementation in ("upcycled_default", "eager", "quantized"):  # "quantized" runs sorted_mm on the float layer
        assert (_logits(quantised, implementation) - expected).abs().max() <= 1e-5, implementation
    assert (_logits(model) - expected).abs().max() > 1e-4  # quantisation did change the function


def test_save_and_reload_keep_the_integer_tensors(tmp_path):
    quantised, _ = _quantised(_float_model("llama", tmp_path))
    quantised.save_pretrained(tmp_path / "int")
    before = quantised.state_dict()
    for dtype in (torch.float32, torch.bfloat16):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int", dtype=dtype).eval()
        assert isinstance(loaded.moe_blocks()[1].experts, UpcycledQuantizedExperts)
        after = loaded.state_dict()
        assert after.keys() == before.keys()
        for name, tensor in before.items():
            if not tensor.is_floating_point() or name.endswith("_scale"):  # codes and scales, whatever the dtype
                assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
            else:
                assert after[name].dtype == dtype, name
        if dtype == torch.float32:
            assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
            assert torch.equal(_logits(loaded), _logits(quantised))
    assert "model.model.layers.1.mlp.experts.gate_up_proj_int4" in before
    assert_same_logits_without_package({"int": tmp_path / "int"}, VOCAB, tmp_path)
