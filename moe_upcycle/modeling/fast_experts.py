"""Sorted-token experts kernel: one sort, one gather, contiguous per-expert matmuls, one weighted scatter back.

Part of the self-contained runtime folder copied next to checkpoints, so it imports only ``torch``.

:func:`sorted_experts_forward` has the contract of the experts modules' ``forward`` (and of Transformers'
``ExpertsInterface`` functions): ``hidden_states`` [T, H], ``top_k_index`` [T, k], ``top_k_weights`` [T, k]
-> [T, H]. It reads ``gate_up_proj`` [E, 2I, H] (gate rows first, then up) or ``up_proj`` [E, I, H],
``down_proj`` [E, H, I], the optional ``*_bias`` [E, out], ``act_fn``, ``num_experts``, ``has_gate`` and
``has_bias`` of the experts module.

Forward and backward are one :class:`torch.autograd.Function`, so autograd records a single node instead of
a chain of gathers, slices and per-expert matmuls:

- the (token, slot) pairs are sorted by expert once (stable argsort) and the hidden states gathered once;
- every expert runs ``mm``/``addmm`` on its contiguous row range, writing straight into preallocated
  buffers (``out=``), and the weight gradients are written straight into the [E, out, in] gradient tensors;
- the routing weights scale the down-projection output before a single ``index_add_`` back to tokens;
- the backward reuses the sort, gathers the output gradient once and scatters the input gradient once,
  without one-hot masks, zero-filled per-slice gradients or transposed weight copies.

SiLU/GELU activations use their fused ATen backward; any other ``act_fn`` is differentiated by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _activation_kind(act_fn: object) -> str:
    """'silu', 'gelu', 'gelu_tanh' when the fused ATen backward applies, else 'generic'."""
    if act_fn is F.silu or isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
        return "silu"
    if act_fn is F.gelu or type(act_fn).__name__ == "GELUActivation" and getattr(act_fn, "act", None) is F.gelu:
        return "gelu"
    if isinstance(act_fn, nn.GELU):
        return "gelu_tanh" if act_fn.approximate == "tanh" else "gelu"
    return "generic"


def _activation_backward(kind: str, act_fn, grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
    """out <- grad * act_fn'(x) (``out`` may be a strided view)."""
    if kind == "silu":
        torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=out)
    elif kind in ("gelu", "gelu_tanh"):
        torch.ops.aten.gelu_backward.grad_input(grad, x, approximate="tanh" if kind == "gelu_tanh" else "none", grad_input=out)
    else:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (result,) = torch.autograd.grad(act_fn(leaf), leaf, grad)
        out.copy_(result)


def _expert_ranges(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every expert with at least one routed row."""
    ranges, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            ranges.append((expert, start, start + count))
        start += count
    return ranges


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ranges, out: torch.Tensor) -> torch.Tensor:
    """out[rows of e] <- x[rows of e] @ weight[e].T (+ bias[e]) for every expert range."""
    for expert, start, end in ranges:
        if bias is None:
            torch.mm(x[start:end], weight[expert].t(), out=out[start:end])
        else:
            torch.addmm(bias[expert], x[start:end], weight[expert].t(), out=out[start:end])
    return out


def _project_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ranges, need_weight: bool,
                      need_bias: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``_project`` for weight [E, out, in] and bias [E, out] (None where not needed); the input
    gradient grad @ weight[e] overwrites ``x`` (no longer needed) in place, expert by expert."""
    grad_w = None
    if need_weight:  # fresh: autograd takes ownership; experts without rows get zeros
        grad_w = torch.empty_like(weight) if len(ranges) == weight.size(0) else torch.zeros_like(weight)
    grad_b = torch.zeros(weight.shape[:2], dtype=weight.dtype, device=weight.device) if need_bias else None
    for expert, start, end in ranges:
        g, xe = grad[start:end], x[start:end]
        if need_weight:
            torch.mm(g.t(), xe, out=grad_w[expert])
        if need_bias:
            torch.sum(g, dim=0, out=grad_b[expert])
        torch.mm(g, weight[expert], out=xe)
    return grad_w, grad_b


def _route(top_k_index: torch.Tensor, num_experts: int):
    """Sort the T*k (token, slot) pairs by expert: (order [S], token of each sorted row [S], expert ranges)."""
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts].tolist()  # one host sync
    token = torch.div(order, top_k_index.size(-1), rounding_mode="floor")
    return order, token, _expert_ranges(counts)


def _forward(hidden, weights_sorted, token, ranges, up_w, up_b, down_w, down_b, act_fn, has_gate, save=True):
    """The experts on sorted rows; returns (output [T, H], tensors the backward needs, or Nones if not ``save``)."""
    x = hidden.index_select(0, token)  # [S, H]
    up = _project(x, up_w, up_b, ranges, hidden.new_empty(x.size(0), up_w.size(1)))  # [S, 2I] or [S, I]
    if has_gate:
        gate, lin = up.chunk(2, dim=-1)
        act = act_fn(gate)
        h = act * lin if save else act.mul_(lin)  # [S, I]
    else:
        act = None
        h = act_fn(up)
    y = _project(h, down_w, down_b, ranges, hidden.new_empty(x.size(0), down_w.size(1)))  # [S, H], unweighted
    weighted = y * weights_sorted.unsqueeze(-1) if save else y.mul_(weights_sorted.unsqueeze(-1))
    out = torch.zeros_like(hidden).index_add_(0, token, weighted)
    return out, (up, act, h, y) if save else (None,) * 4


class _SortedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, up_w, up_b, down_w, down_b, act_fn, has_gate, num_experts):
        order, token, ranges = _route(top_k_index, num_experts)
        weights_sorted = top_k_weights.reshape(-1).index_select(0, order)
        out, (up, act, h, y) = _forward(hidden, weights_sorted, token, ranges, up_w, up_b, down_w, down_b, act_fn, has_gate)
        ctx.save_for_backward(hidden, order, token, weights_sorted, up_w, down_w, up, act, h, y)
        ctx.ranges, ctx.act_fn, ctx.has_gate = ranges, act_fn, has_gate
        ctx.has_up_b, ctx.has_down_b = up_b is not None, down_b is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # The saved activations are overwritten by their gradients (no [S, I] / [S, 2I] allocations): a second
        # backward through the same graph fails autograd's saved-tensor version check instead of going wrong.
        hidden, order, token, weights_sorted, up_w, down_w, up, act, h, y = ctx.saved_tensors
        need = ctx.needs_input_grad  # hidden, index, weights, up_w, up_b, down_w, down_b, ...
        ranges, act_fn = ctx.ranges, ctx.act_fn
        kind = _activation_kind(act_fn)
        g = grad_out.contiguous().index_select(0, token)  # [S, H]
        grad_weights = None
        if need[2]:
            grad_weights = torch.empty_like(weights_sorted)
            grad_weights[order] = (g * y).sum(dim=-1)
            grad_weights = grad_weights.view(hidden.size(0), -1)
        g.mul_(weights_sorted.unsqueeze(-1))  # gradient of the unweighted down output
        grad_down_w, grad_down_b = _project_backward(g, h, down_w, ranges, need[5], need[6] and ctx.has_down_b)
        grad_h = h  # [S, I], overwritten in place
        del g, h
        if ctx.has_gate:
            gate, lin = up.chunk(2, dim=-1)
            grad_lin = act.mul_(grad_h)
            _activation_backward(kind, act_fn, grad_h.mul_(lin), gate, gate)
            lin.copy_(grad_lin)
        else:
            _activation_backward(kind, act_fn, grad_h, up, up)
        grad_up = up
        x = hidden.index_select(0, token)  # [S, H], becomes the gradient of the sorted rows
        grad_up_w, grad_up_b = _project_backward(grad_up, x, up_w, ranges, need[3], need[4] and ctx.has_up_b)
        grad_hidden = torch.zeros_like(hidden).index_add_(0, token, x) if need[0] else None
        return grad_hidden, None, grad_weights, grad_up_w, grad_up_b, grad_down_w, grad_down_b, None, None, None


def sorted_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts forward (``ExpertsInterface`` contract): [T, H], [T, k], [T, k] -> [T, H]."""
    has_gate, has_bias = getattr(self, "has_gate", True), getattr(self, "has_bias", False)
    up_w = self.gate_up_proj if has_gate else self.up_proj
    up_b = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    down_w, down_b = self.down_proj, self.down_proj_bias if has_bias else None
    if getattr(self, "is_transposed", False):
        raise NotImplementedError("sorted_experts_forward expects [E, out, in] expert weights (is_transposed=False)")
    if getattr(self, "has_post_expert_norm", False):
        raise NotImplementedError("sorted_experts_forward does not support post-expert norms")
    if getattr(self, "is_concatenated", True) is False:
        raise NotImplementedError("sorted_experts_forward expects concatenated [gate; up] weights")
    dtype = up_w.dtype
    if torch.is_autocast_enabled(hidden_states.device.type):
        dtype = torch.get_autocast_dtype(hidden_states.device.type)
    params = [p if p is None else p.to(dtype) for p in (up_w, up_b, down_w, down_b)]
    hidden = hidden_states.to(dtype).contiguous()
    weights = top_k_weights.to(dtype)
    num_experts = up_w.size(0)
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weights, *params)):
            out = _SortedExperts.apply(hidden, top_k_index, weights, *params, self.act_fn, has_gate, num_experts)
        else:
            order, token, ranges = _route(top_k_index, num_experts)
            weights_sorted = weights.reshape(-1).index_select(0, order)
            out, _ = _forward(hidden, weights_sorted, token, ranges, *params, self.act_fn, has_gate, save=False)
    return out.to(hidden_states.dtype)


__all__ = ["sorted_experts_forward"]
