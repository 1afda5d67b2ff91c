"""Sorted-token experts kernel: one sort, one gather, blocked per-expert matmuls, one weighted combine.

Part of the self-contained runtime folder copied next to checkpoints, so it imports only ``torch``.

:func:`sorted_experts_forward` has the contract of the experts modules' ``forward`` and of Transformers'
``ExpertsInterface`` functions: ``hidden_states`` [T, H], ``top_k_index`` [T, k], ``top_k_weights`` [T, k]
-> [T, H]. It reads from the experts module ``gate_up_proj`` [E, 2I, H] (gate rows first, then up) or
``up_proj`` [E, I, H], ``down_proj`` [E, H, I], the ``*_bias`` [E, out] when ``has_bias``, ``act_fn`` and
``has_gate``.

Forward and backward are one :class:`torch.autograd.Function`, so autograd records one node instead of a
chain of gathers, slices and per-expert matmuls:

- the S = T*k (token, slot) pairs are sorted by expert once (stable sort, one host sync for the counts); the
  hidden states are gathered once into expert-contiguous rows;
- each expert runs one ``mm``/``addmm`` per projection on its rows, writing into preallocated buffers (``out=``:
  BLAS never reads them, ``beta = 0``; tests/test_uninitialised_memory.py checks it); the weight gradients are
  written straight into the [E, out, in] gradient tensors (no transposed copies, no [E, ...] zero-filled
  per-slice gradients). Whole projections, not column blocks: 512-column blocks (10x the calls) measured 7-9%
  slower on a quiet machine (1 and 2 threads) and 2x slower on a busy one (load ~4 on 2 cores; forward and
  forward+backward at 1024 tokens, 0.5B shapes);
- the outputs go back to (token, slot) order with one ``index_select`` and are mixed by the routing weights
  with one ``bmm`` ([T, 1, k] @ [T, k, H]): no one-hot masks, no ``index_add_`` (a slow scatter on CPU);
- activations are kept per expert ([n_e, 2I], [n_e, I]: sizes the allocator recycles, where [S, 2I] buffers
  would be fresh pages, i.e. page faults, at every call), as many as eager autograd keeps;
- the backward overwrites each saved activation with its gradient (SiLU/GELU through their fused ATen
  backward; any other ``act_fn`` is differentiated by autograd), so besides the weight gradients it allocates
  only a few [S, H] tensors. A second backward through the same graph (``retain_graph=True``) therefore fails
  autograd's saved-tensor version check instead of returning wrong gradients.

:func:`eager_experts_loop` is the eager reference every experts kernel is tested against (a loop over active
experts, one gather and one scatter each); experts modules of any storage run it through a ``project`` function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _activation_kind(act_fn: object) -> str:
    """'silu', 'gelu' or 'gelu_tanh' where a fused ATen backward applies, else 'generic' (autograd)."""
    if act_fn is F.silu or isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
        return "silu"
    if isinstance(act_fn, nn.GELU):
        return "gelu_tanh" if act_fn.approximate == "tanh" else "gelu"
    if type(act_fn).__name__ in ("GELUActivation", "GELUTanh"):  # Transformers' wrappers keep the function in .act
        act_fn = act_fn.act
    if act_fn is F.gelu:
        return "gelu"
    if getattr(act_fn, "func", None) is F.gelu and getattr(act_fn, "keywords", None) == {"approximate": "tanh"}:
        return "gelu_tanh"
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
    experts, order = torch.sort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    token = torch.div(order, top_k_index.size(-1), rounding_mode="floor")
    bounds = torch.arange(num_experts + 1, device=flat.device, dtype=experts.dtype)
    bounds = torch.searchsorted(experts, bounds).tolist()  # the one host sync (searchsorted: deterministic on GPUs)
    if bounds[0] != 0 or bounds[-1] != flat.numel():
        raise ValueError(f"top_k_index holds expert ids outside [0, {num_experts})")
    ranges = [(e, bounds[e], bounds[e + 1]) for e in range(num_experts) if bounds[e + 1] > bounds[e]]
    return order, inverse, token, ranges


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out <- x @ weight.T (+ bias): x [n, in], weight [out, in], out [n, out] (may be a row slice)."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _experts(hidden, top_k_index, top_k_weights, up_w, up_b, down_w, down_b, act_fn, has_gate, save):
    """Forward on expert-sorted rows -> (output [T, H], routing, per-expert activations to save or None).

    The activations are allocated per expert ([n_e, 2I], [n_e, I]): blocks of this size are recycled by the
    memory allocator, where [S, 2I] buffers would be fresh pages (page faults) at every call.
    """
    num_tokens, top_k = top_k_index.shape
    order, inverse, token, ranges = _route(top_k_index, up_w.size(0))
    x = hidden.index_select(0, token)  # [S, H]
    y = hidden.new_empty(x.shape)  # [S, H]: unweighted expert outputs, sorted rows
    saved = []
    for expert, start, end in ranges:
        up = _linear(x[start:end], up_w[expert], None if up_b is None else up_b[expert],
                     x.new_empty(end - start, up_w.size(1)))  # [n, 2I] (gate | up) or [n, I]
        if has_gate:
            gate, lin = up.chunk(2, dim=-1)
            act = act_fn(gate)
            h = act * lin if save else act.mul_(lin)  # [n, I]
        else:
            act, h = None, act_fn(up)
        _linear(h, down_w[expert], None if down_b is None else down_b[expert], y[start:end])
        if save:
            saved += [up, act, h]
    y = y.index_select(0, inverse).view(num_tokens, top_k, y.size(-1))  # [T, k, H]
    out = torch.bmm(top_k_weights.unsqueeze(1), y).squeeze(1)  # sum_j w[t, j] * y[t, j]
    return out, (order, inverse, token, ranges), (saved + [y] if save else None)


def _parameter_grads(grads: dict, name: str, expert: int, grad_out: torch.Tensor, inp: torch.Tensor) -> None:
    """Weight (and bias) gradient of expert ``expert``'s projection ``name``: grad_out [n, out], inp [n, in]."""
    if name in grads:
        torch.mm(grad_out.t(), inp, out=grads[name][expert])  # [out, n] @ [n, in]
    if name + "_bias" in grads:
        torch.sum(grad_out, dim=0, out=grads[name + "_bias"][expert])


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
        hidden, weights, up_w, down_w, order, inverse, token, *saved = ctx.saved_tensors
        y = saved.pop()
        need = ctx.needs_input_grad  # hidden, index, weights, up_w, up_b, down_w, down_b, act_fn, has_gate
        ranges, act_fn = ctx.ranges, ctx.act_fn
        num_tokens, top_k = weights.shape
        grad_out = grad_out.contiguous()
        grad_weights = torch.bmm(y, grad_out.unsqueeze(-1)).squeeze(-1) if need[2] else None  # [T, k]
        # gradient of the unweighted expert outputs, rows sorted by expert: [S, H] (y's buffer is reused)
        g = torch.mul(grad_out.unsqueeze(1), weights.unsqueeze(-1), out=y).flatten(0, 1)
        g = g.index_select(0, order)
        del y
        grads = {}  # fresh tensors (autograd takes them over); zeros only where an expert got no rows
        for name, weight, need_w, need_b in (("down", down_w, need[5], need[6] and ctx.has_down_b),
                                             ("up", up_w, need[3], need[4] and ctx.has_up_b)):
            if need_w:
                grads[name] = torch.empty_like(weight) if len(ranges) == weight.size(0) else torch.zeros_like(weight)
            if need_b:
                grads[name + "_bias"] = weight.new_zeros(weight.shape[:2])
        x = hidden.index_select(0, token)  # [S, H], overwritten by its gradient
        # Expert by expert, each saved activation is overwritten by its gradient (no [S, I]-sized allocations).
        for i, (expert, start, end) in enumerate(ranges):
            up, act, h = saved[3 * i:3 * i + 3]
            saved[3 * i:3 * i + 3] = None, None, None
            g_e, x_e = g[start:end], x[start:end]
            _parameter_grads(grads, "down", expert, g_e, h)
            torch.mm(g_e, down_w[expert], out=h)  # h <- dL/dh: [n, H] @ [H, I]
            if ctx.has_gate:  # up = [gate | lin], h = act(gate) * lin
                gate, lin = up.chunk(2, dim=-1)
                grad_lin = act.mul_(h)
                _activation_backward(act_fn, h.mul_(lin), gate, out=gate)
                lin.copy_(grad_lin)
            else:  # h = act(up)
                _activation_backward(act_fn, h, up, out=up)
            _parameter_grads(grads, "up", expert, up, x_e)  # up <- dL/dup
            if need[0]:
                torch.mm(up, up_w[expert], out=x_e)  # x <- dL/dx: [n, 2I] @ [2I, H]
        grad_hidden = x.index_select(0, inverse).view(num_tokens, top_k, x.size(-1)).sum(1) if need[0] else None
        return (grad_hidden, None, grad_weights, grads.get("up"), grads.get("up_bias"), grads.get("down"),
                grads.get("down_bias"), None, None)


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


Project = Callable[[str, torch.Tensor, int], torch.Tensor]
"""(projection name, x [n, in], expert) -> expert's projection of x [n, out], bias included."""


def expert_mlp(project: Project, x: torch.Tensor, expert: int, act_fn, has_gate: bool) -> torch.Tensor:
    """Expert ``expert`` on its rows x [n, H] -> [n, H]: ``down(act(gate) * up)`` with ``gate_up_proj`` (gate rows
    first, then up), or ``down(act(up))`` with ``up_proj``."""
    if has_gate:
        gate, up = project("gate_up_proj", x, expert).chunk(2, dim=-1)
        h = act_fn(gate) * up
    else:
        h = act_fn(project("up_proj", x, expert))
    return project("down_proj", h, expert)


def eager_experts_loop(project: Project, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor, *, num_experts: int, act_fn, has_gate: bool) -> torch.Tensor:
    """The eager reference loop over active experts: [T, H], [T, k], [T, k] -> [T, H]."""
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=num_experts).permute(2, 1, 0)  # [E, k, T]
        active = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert in active[:, 0].tolist():
        slot, token = torch.where(expert_mask[expert])
        h = expert_mlp(project, hidden_states[token], expert, act_fn, has_gate) * top_k_weights[token, slot, None]
        final.index_add_(0, token, h.to(final.dtype))
    return final


__all__ = ["eager_experts_loop", "expert_mlp", "sorted_experts_forward"]
