"""Our experts kernels never read uninitialised memory.

The kernels write into buffers they allocate without initialising (``new_empty``, ``empty_like``, ``mm(out=...)``).
If any of them read such a buffer before writing it, the result would depend on what the allocator handed out:
NaN, denormal floats (slow arithmetic), or freed integer indices (whose bits read as denormal floats). Each case
runs forward and backward twice, once on a quiet allocator and once poisoned, and asks for bit-identical outputs and
gradients:

- ``uninitialised``: every uninitialised allocation made while the kernel runs (forward and backward) comes back
  filled with NaN (floats) or the largest integer (indices): any read of it shows;
- ``recycled``: the allocator's free memory is first filled with NaN, denormal floats and integer indices, as a
  training step leaves it, then handed back.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig
from transformers.activations import ACT2FN

from moe_upcycle import UpcycledMoeConfig
from moe_upcycle.modeling.modeling_upcycled_moe import experts_class

H, I, E, K, T = 48, 300, 6, 2, 40  # 2I = 600 and I = 300 columns: more than one 512-column block, a partial last block

aten = torch.ops.aten
_UNINITIALISED = {aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default,
                  aten.empty_strided.default, aten.new_empty_strided.default}


class _PoisonUninitialised(TorchDispatchMode):
    """Fill every uninitialised allocation with NaN (floating point) or the dtype's largest value (integers)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _UNINITIALISED:
            out.fill_(math.nan if out.is_floating_point() else True if out.dtype == torch.bool else torch.iinfo(out.dtype).max)
        return out


def _poison_recycled_memory() -> None:
    """Allocate, fill and free tensors of every size up to a few MB: NaN, denormal floats and int64 indices."""
    held = []
    for numel in (2 ** p for p in range(4, 21)):
        held += [torch.full((numel,), math.nan), torch.full((numel,), 1e-40),  # float32 denormal
                 torch.arange(numel), torch.full((numel,), 3, dtype=torch.int32)]  # small integers read as denormals
    assert ((held[-3] > 0) & (held[-3] < torch.finfo(torch.float32).tiny)).all()
    del held


def _experts(kind: str, implementation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4)
    config = UpcycledMoeConfig(text_config=text, num_experts=E, num_experts_per_tok=K,
                               expert_kind="mlp" if kind == "mlp" else "glu", expert_bias=kind != "glu")
    act_fn = ACT2FN["gelu_new"] if kind == "mlp" else ACT2FN["silu"]  # gelu_new: the generic autograd backward
    experts = experts_class(config)(config, act_fn)
    for name, parameter in experts.named_parameters():
        if name.endswith("_bias"):
            torch.nn.init.normal_(parameter, std=0.1)
    experts.config._experts_implementation = implementation
    return experts


def _inputs(routing: str) -> tuple[torch.Tensor, ...]:
    """hidden [T, H], top_k_index [T, K], top_k_weights [T, K], upstream gradient [T, H]."""
    g = torch.Generator().manual_seed(1)
    experts_used = E if routing == "every expert" else E - 1  # "one idle expert": the last one gets no token
    index = torch.stack([torch.randperm(experts_used, generator=g)[:K] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    return torch.randn(T, H, generator=g), index, weights, torch.randn(T, H, generator=g)


def _step(experts: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    hidden, index, weights, grad_out = inputs
    hidden, weights = hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    out = experts(hidden, index, weights)
    out.backward(grad_out)
    return {"output": out.detach(), "grad hidden": hidden.grad, "grad weights": weights.grad,
            **{f"grad {n}": p.grad for n, p in experts.named_parameters()}}


@pytest.mark.parametrize("routing", ["every expert", "one idle expert"])
@pytest.mark.parametrize("kind", ["glu", "glu_bias", "mlp"])
@pytest.mark.parametrize("implementation", ["upcycled_default", "sorted_mm"])
def test_outputs_and_gradients_do_not_depend_on_uninitialised_memory(implementation, kind, routing):
    experts, inputs = _experts(kind, implementation), _inputs(routing)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only add overhead (and contention on busy machines)
    try:
        reference = _step(experts, inputs)
        with _PoisonUninitialised():
            poisoned = {"uninitialised": _step(experts, inputs)}
        _poison_recycled_memory()
        poisoned["recycled"] = _step(experts, inputs)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.isfinite(t).all() for t in reference.values())
    for poison, results in poisoned.items():
        assert results.keys() == reference.keys()
        for name, expected in reference.items():
            assert torch.equal(results[name], expected), f"{name} changed when {poison} memory was poisoned"


def test_the_poison_reaches_uninitialised_buffers():
    """The check above would see a read: an uninitialised buffer made under the mode holds the poison."""
    with _PoisonUninitialised():
        floats, indices = torch.empty(4, 3).t(), torch.empty_like(torch.arange(5))
    assert floats.isnan().all() and (indices == torch.iinfo(torch.int64).max).all()
