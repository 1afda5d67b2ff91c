"""Sorted-token experts kernel: one sort, one gather, contiguous per-expert matmuls, one weighted combine.

Part of the self-contained runtime folder copied next to checkpoints, so it imports only ``torch``.

:func:`sorted_experts_forward` has the contract of the experts modules' ``forward`` and of Transformers'
``ExpertsInterface`` functions: ``hidden_states`` [T, H], ``top_k_index`` [T, k], ``top_k_weights`` [T, k]
-> [T, H]. It reads from the experts module ``gate_up_proj`` [E, 2I, H] (gate rows first, then up) or
``up_proj`` [E, I, H], ``down_proj`` [E, H, I], the ``*_bias`` [E, out] when ``has_bias``, ``act_fn`` and
``has_gate``.

Forward and backward are one :class:`torch.autograd.Function`, so autograd records one node instead of a
chain of gathers, slices and per-expert matmuls, and the backward allocates almost nothing:

- the T*k (token, slot) pairs are sorted by expert once (stable argsort); the hidden states are gathered
  once into expert-contiguous rows;
- each expert runs ``mm``/``addmm`` on its row range, writing into preallocated buffers (``out=``); the weight
  gradients are written straight into the [E, out, in] gradient tensors (no transposed copies);
- the outputs are put back in (token, slot) order with one ``index_select`` and mixed by the routing weights
  with one ``bmm`` ([T, 1, k] @ [T, k, H]): no one-hot masks, no ``index_add_`` (a slow scatter on CPU);
- the backward overwrites the saved activations with their gradients ([S, 2I] and [S, I] buffers reused,
  SiLU/GELU through their fused ATen backward; any other ``act_fn`` is differentiated by autograd). A second
  backward through the same graph (``retain_graph=True``) therefore fails autograd's saved-tensor version check
  instead of returning wrong gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _activation_kind(act_fn: object) -> str:
    """'silu', 'gelu' or 'gelu_tanh' where a fused ATen backward applies, else 'generic'."""
    if act_fn is F.silu or isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
        return "silu"
    if isinstance(act_fn, nn.GELU):
        return "gelu_tanh" if act_fn.approximate == "tanh" else "gelu"
    if act_fn is F.gelu or (type(act_fn).__name__ == "GELUActivation" and getattr(act_fn, "act", None) is F.gelu):
        return "gelu"
    return "generic"


def _activation_backward(act_fn, grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
    """out <- grad * act_fn'(x); ``out`` may be a strided view and may be ``x`` itself."""
    kind = _activation_kind(act_fn)
    if kind == "silu":
        torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=out)
    elif kind != "generic":
        torch.ops.aten.gelu_backward.grad_input(grad, x, approximate="tanh" if kind == "gelu_tanh" else "none", grad_input=out)
    else:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (result,) = torch.autograd.grad(act_fn(leaf), leaf, grad)
        out.copy_(result)


def _route(top_k_index: torch.Tensor, num_experts: int):
    """Sort the S = T*k (token, slot) pairs by expert.

    Returns ``order`` [S] (sorted row -> flat pair), ``inverse`` [S] (flat pair -> sorted row), ``token`` [S]
    (sorted row -> token) and the ``(expert, start, end)`` row range of every expert with at least one row.
    """
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    token = torch.div(order, top_k_index.size(-1), rounding_mode="floor")
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # the one host sync
    ranges, start = [], 0
    for expert, count in enumerate(counts[:num_experts]):
        if count:
            ranges.append((expert, start, start + count))
        start += count
    if start != flat.numel():
        raise ValueError(f"top_k_index holds expert ids outside [0, {num_experts})")
    return order, inverse, token, ranges


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ranges) -> torch.Tensor:
    """Rows of expert e: x @ weight[e].T (+ bias[e]); [S, in] -> [S, out]."""
    out = x.new_empty(x.size(0), weight.size(1))
    for expert, start, end in ranges:
        if bias is None:
            torch.mm(x[start:end], weight[expert].t(), out=out[start:end])
        else:
            torch.addmm(bias[expert], x[start:end], weight[expert].t(), out=out[start:end])
    return out


def _project_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ranges, need_weight: bool,
                      need_bias: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weight [E, out, in] and bias [E, out] gradients of :func:`_project` (None where not needed).

    The input gradient ``grad @ weight[e]`` overwrites ``x`` in place, expert by expert, after ``x`` was used.
    """
    grad_w = grad_b = None
    if need_weight:  # fresh (autograd takes it over); zeros only if some expert got no rows
        grad_w = torch.empty_like(weight) if len(ranges) == weight.size(0) else torch.zeros_like(weight)
    if need_bias:
        grad_b = torch.zeros(weight.shape[:2], dtype=weight.dtype, device=weight.device)
    for expert, start, end in ranges:
        g, xe = grad[start:end], x[start:end]
        if need_weight:
            torch.mm(g.t(), xe, out=grad_w[expert])
        if need_bias:
            torch.sum(g, dim=0, out=grad_b[expert])
        torch.mm(g, weight[expert], out=xe)
    return grad_w, grad_b


def _experts(hidden, top_k_index, top_k_weights, up_w, up_b, down_w, down_b, act_fn, has_gate, save):
    """Forward on expert-sorted rows -> (output [T, H], routing, saved activations or None)."""
    num_tokens, top_k = top_k_index.shape
    order, inverse, token, ranges = _route(top_k_index, up_w.size(0))
    x = hidden.index_select(0, token)  # [S, H]
    up = _project(x, up_w, up_b, ranges)  # [S, 2I] (gate | up) or [S, I]
    del x
    if has_gate:
        gate, lin = up.chunk(2, dim=-1)
        act = act_fn(gate)
        h = act * lin if save else act.mul_(lin)  # [S, I]
    else:
        act, h = None, act_fn(up)
    y = _project(h, down_w, down_b, ranges).index_select(0, inverse).view(num_tokens, top_k, -1)  # [T, k, H]
    out = torch.bmm(top_k_weights.unsqueeze(1), y).squeeze(1)  # sum_j w[t, j] * y[t, j]
    routing = (order, inverse, token, ranges)
    return out, routing, ((up, act, h, y) if save else None)


class _SortedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, up_w, up_b, down_w, down_b, act_fn, has_gate):
        out, routing, saved = _experts(hidden, top_k_index, top_k_weights, up_w, up_b, down_w, down_b, act_fn, has_gate, True)
        order, inverse, token, ranges = routing
        ctx.save_for_backward(hidden, top_k_weights, up_w, down_w, order, inverse, token, *saved)
        ctx.ranges, ctx.act_fn, ctx.has_gate = ranges, act_fn, has_gate
        ctx.has_up_b, ctx.has_down_b = up_b is not None, down_b is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weights, up_w, down_w, order, inverse, token, up, act, h, y = ctx.saved_tensors
        need = ctx.needs_input_grad  # hidden, index, weights, up_w, up_b, down_w, down_b, act_fn, has_gate
        ranges, act_fn = ctx.ranges, ctx.act_fn
        num_tokens, top_k = weights.shape
        grad_out = grad_out.contiguous()
        grad_weights = torch.bmm(y, grad_out.unsqueeze(-1)).squeeze(-1) if need[2] else None  # [T, k]
        # gradient of the unweighted expert outputs, in expert-sorted order: [S, H]
        g = torch.mul(grad_out.unsqueeze(1), weights.unsqueeze(-1), out=y).view(-1, y.size(-1)).index_select(0, order)
        del y
        grad_down_w, grad_down_b = _project_backward(g, h, down_w, ranges, need[5], need[6] and ctx.has_down_b)
        del g
        grad_h = h  # overwritten in place by _project_backward
        if ctx.has_gate:
            gate, lin = up.chunk(2, dim=-1)
            grad_lin = act.mul_(grad_h)
            _activation_backward(act_fn, grad_h.mul_(lin), gate, out=gate)
            lin.copy_(grad_lin)
        else:
            _activation_backward(act_fn, grad_h, up, out=up)
        del act, h, grad_h
        grad_up = up
        x = hidden.index_select(0, token)  # [S, H], overwritten by its gradient
        grad_up_w, grad_up_b = _project_backward(grad_up, x, up_w, ranges, need[3], need[4] and ctx.has_up_b)
        grad_hidden = x.index_select(0, inverse).view(num_tokens, top_k, -1).sum(1) if need[0] else None
        return grad_hidden, None, grad_weights, grad_up_w, grad_up_b, grad_down_w, grad_down_b, None, None


def sorted_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts forward with the ``ExpertsInterface`` contract: [T, H], [T, k], [T, k] -> [T, H]."""
    has_gate, has_bias = getattr(self, "has_gate", True), getattr(self, "has_bias", False)
    if getattr(self, "is_transposed", False) or not getattr(self, "is_concatenated", True):
        raise NotImplementedError("sorted_experts_forward expects [E, out, in] weights with concatenated [gate; up] rows")
    if getattr(self, "has_post_expert_norm", False) or getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("sorted_experts_forward supports neither post-expert norms nor expert parallelism")
    up_w = self.gate_up_proj if has_gate else self.up_proj
    up_b = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    down_w, down_b = self.down_proj, (self.down_proj_bias if has_bias else None)
    device_type = hidden_states.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else up_w.dtype
    params = [None if p is None else p.to(dtype) for p in (up_w, up_b, down_w, down_b)]
    hidden, weights = hidden_states.to(dtype).contiguous(), top_k_weights.to(dtype).contiguous()
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weights, *params)):
            out = _SortedExperts.apply(hidden, top_k_index, weights, *params, self.act_fn, has_gate)
        else:
            out = _experts(hidden, top_k_index, weights, *params, self.act_fn, has_gate, False)[0]
    return out.to(hidden_states.dtype)


__all__ = ["sorted_experts_forward"]
