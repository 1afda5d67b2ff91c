"""Experts stored in 8 or 4 bits, each expert of a layer in its own precision (MoQE, Kim et al. 2023, arXiv
2310.02410; bit-widths per expert: MC-MoE, Li et al. 2024, arXiv 2410.06270).

Schemes (``QUANT_SCHEMES``), for one projection W [out, in] (or a stack [n, out, in]), symmetric absmax:

- ``int8``: one float32 scale per output row, ``s = max_j |W_ij| / 127``, codes ``q = clamp(round(W / s), -127, 127)``
  stored as int8 [out, in], scales [out, 1];
- ``int4``: one float32 scale per group of ``group_size`` input columns, ``s = max |W_group| / 7``, codes in [-7, 7]
  stored two per byte as uint8 [out, in / 2]: ``byte = (q_2j + 8) | ((q_2j+1 + 8) << 4)`` (column 2j in the low
  nibble), scales [out, in / group_size];
- ``int2``: as int4 with codes in [-1, 1] (``s = max |W_group|``), four per byte (offset 2; column 4j + i in bits
  2i, 2i + 1): the cheapest precision that ``quantize --bits auto`` may give experts that matter little.

Dequantisation is ``q * s``; every element's error is at most ``s / 2`` (rounding to the nearest code). A group of
zeros gets scale 1, so it dequantises to exact zeros.

Layout of one MoE layer (:class:`UpcycledQuantizedExperts`), per projection P (``gate_up_proj`` [E, 2I, H] for
gated experts, else ``up_proj`` [E, I, H]; ``down_proj`` [E, H, I]): expert e is stored in precision
``config.expert_precision[str(layer)][e]`` at slot = the number of earlier experts with that precision:

- ``P_int8`` int8 [n8, out, in] and ``P_int8_scale`` float32 [n8, out, 1] (persistent buffers);
- ``P_int4`` uint8 [n4, out, in / 2] and ``P_int4_scale`` float32 [n4, out, in / group_size] (persistent buffers);
- ``P`` [nf, out, in] in the model's dtype (a parameter) for experts kept in float;
- ``P_bias`` [E, out] (a parameter, every expert) when the family has expert biases.

:func:`quantize_experts` writes these tensors from a float [E, out, in] projection; :meth:`~UpcycledQuantizedExperts.
reference` is the eager reference (the whole layer dequantised, the eager loop of the float experts);
:func:`quantized_experts_forward`, registered as the experts kernel ``quantized``, dequantises only the experts a call
selects, one at a time, and again in the backward pass instead of keeping them (frozen integer experts: gradients
reach the hidden states and the routing weights, never the integer tensors).

Part of the self-contained runtime folder: imports only ``torch`` and its siblings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fast_experts import _route, eager_experts_loop, expert_mlp, sorted_experts_forward

FLOAT = "float"  # an expert kept in the model's dtype
SCALE_DTYPE = torch.float32


def check_group_size(in_features: int | None, group_size: object) -> str | None:
    """Why ``group_size`` cannot group the ``in_features`` input columns of a projection, or None when it can
    (``in_features=None``: only the group size itself is checked)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        return f"the group size must be an even integer >= 2, got {group_size!r}"
    if in_features is not None and in_features % group_size:
        return f"the group size {group_size} does not divide the input dimension {in_features}"
    return None


def _absmax_codes(weight: torch.Tensor, group: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantisation of groups of ``group`` consecutive input columns.

    weight [..., out, in] -> codes int8 [..., out, in] in [-qmax, qmax], scales float32 [..., out, in / group].
    """
    if not torch.isfinite(weight).all():
        raise ValueError("cannot quantise a weight that holds infinite or NaN values")
    w = weight.to(SCALE_DTYPE).unflatten(-1, (-1, group))  # [..., out, G, group]
    scale = w.abs().amax(dim=-1) / qmax  # [..., out, G]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero group: any scale gives exact zeros
    codes = torch.round(w / scale.unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8).flatten(-2)
    return codes, scale


def _scaled(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
    """(codes - offset) * scale of each group -> [..., out, in] in ``dtype``: codes [..., out, in] (integers), scale
    [..., out, G]. One float copy of the weight, scaled in place (computed in float32 for lower-precision dtypes), so
    dequantising an expert costs one weight-sized buffer."""
    work = dtype if dtype.itemsize >= SCALE_DTYPE.itemsize else SCALE_DTYPE
    w = codes.to(work)
    if offset:
        w.sub_(offset)
    w.unflatten(-1, (scale.shape[-1], -1)).mul_(scale.to(work).unsqueeze(-1))
    return w.to(dtype)


@dataclass(frozen=True)
class QuantScheme:
    """How one precision stores a projection W [out, in] (or a stack [n, out, in]): integer codes and float32 scales."""

    name: str
    bits: int  # bits of one stored code
    qmax: int  # codes are in [-qmax, qmax]
    codes_dtype: torch.dtype  # dtype of the stored codes
    grouped: bool  # one scale per group of ``group_size`` input columns (else one per output row)

    def check(self, in_features: int, group_size: int) -> None:
        """Raise ``ValueError`` when this scheme cannot store projections with ``in_features`` input columns."""
        reason = check_group_size(in_features, group_size) if self.grouped else None
        if reason:
            raise ValueError(f"{self.name} experts: {reason}")

    def group(self, in_features: int, group_size: int) -> int:
        """Input columns that share one scale."""
        self.check(in_features, group_size)
        return group_size if self.grouped else in_features

    def storage_shapes(self, out_features: int, in_features: int, group_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(codes shape, scales shape) of one expert's [out, in] projection."""
        groups = in_features // self.group(in_features, group_size)
        return (out_features, in_features * self.bits // 8), (out_features, groups)

    def storage(self, out_features: int, in_features: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scales) of one expert's [out, in] projection as meta tensors: their dtype, shape and size."""
        codes_shape, scale_shape = self.storage_shapes(out_features, in_features, group_size)
        return (torch.empty(codes_shape, dtype=self.codes_dtype, device="meta"),
                torch.empty(scale_shape, dtype=SCALE_DTYPE, device="meta"))

    def logical_shape(self, codes_shape: tuple[int, ...], scale_shape: tuple[int, ...], group_size: int) -> tuple[int, int]:
        """[out, in] of the projection stored as codes [out, *] with scales [out, *] (the inverse of :meth:`storage_shapes`)."""
        return codes_shape[0], codes_shape[1] * 8 // self.bits

    def zero_code(self) -> int:
        """The stored value of a code 0 (what a fresh, not yet loaded layer holds: experts that output zeros)."""
        return 0

    def quantize(self, weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """weight [..., out, in] (float) -> (codes [..., out, in * bits / 8], scales float32 [..., out, groups])."""
        return _absmax_codes(weight, self.group(weight.shape[-1], group_size), self.qmax)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
        """(codes, scales) from :meth:`quantize` -> weight [..., out, in] in ``dtype``."""
        return _scaled(codes, scale, dtype)


@dataclass(frozen=True)
class PackedScheme(QuantScheme):
    """Codes in [-qmax, qmax] stored ``8 / bits`` per byte, offset by ``2^(bits-1)``: column ``p*j + i`` of a row in
    bits ``[bits*i, bits*(i+1))`` of its byte j (int4: ``(q_2j + 8) | ((q_2j+1 + 8) << 4)``)."""

    @property
    def _per_byte(self) -> int:
        return 8 // self.bits

    def _shifts(self, device: torch.device) -> torch.Tensor:
        return torch.arange(0, 8, self.bits, dtype=torch.uint8, device=device)  # [per_byte]

    def check(self, in_features: int, group_size: int) -> None:
        super().check(in_features, group_size)
        if in_features % self._per_byte:
            raise ValueError(f"{self.name} experts: {self._per_byte} values share a byte, so the input dimension "
                             f"{in_features} must be a multiple of {self._per_byte}")

    def zero_code(self) -> int:
        return sum((1 << (self.bits - 1)) << shift for shift in range(0, 8, self.bits))

    def quantize(self, weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        codes, scale = super().quantize(weight, group_size)  # [..., out, in] int8
        biased = (codes + (1 << (self.bits - 1))).to(torch.uint8).unflatten(-1, (-1, self._per_byte))  # [..., in/p, p]
        packed = (biased << self._shifts(codes.device)).sum(dim=-1, dtype=torch.uint8)  # disjoint bits: sum = or
        return packed, scale  # [..., out, in * bits / 8]

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
        fields = (codes.unsqueeze(-1) >> self._shifts(codes.device)) & ((1 << self.bits) - 1)  # [..., out, in/p, p]
        return _scaled(fields.flatten(-2), scale, dtype, offset=1 << (self.bits - 1))


QUANT_SCHEMES: dict[str, QuantScheme] = {
    "int8": QuantScheme("int8", bits=8, qmax=127, codes_dtype=torch.int8, grouped=False),
    "int4": PackedScheme("int4", bits=4, qmax=7, codes_dtype=torch.uint8, grouped=True),
    "int2": PackedScheme("int2", bits=2, qmax=1, codes_dtype=torch.uint8, grouped=True),
}
PRECISIONS: tuple[str, ...] = (*QUANT_SCHEMES, FLOAT)  # what ``config.expert_precision`` may name per expert


def scheme_summary(precision: dict[str, list[str]]) -> str:
    """``"8 int2 expert(s), 19 int4 expert(s)"``: how many experts of a ``config.expert_precision`` map each precision
    holds."""
    counts: dict[str, int] = {}
    for row in precision.values():
        for name in row:
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} {name} expert(s)" for name, n in sorted(counts.items()))


def stored_name(projection: str, precision: str) -> str:
    """Name of the tensor holding the experts of ``projection`` stored in ``precision`` (codes, or float weights)."""
    return projection if precision == FLOAT else f"{projection}_{precision}"


def scale_name(projection: str, precision: str) -> str:
    """Name of the scales of the experts of ``projection`` stored in the integer scheme ``precision``."""
    return f"{stored_name(projection, precision)}_scale"


def expert_slots(precisions: list[str] | tuple[str, ...]) -> list[tuple[str, int]]:
    """(precision, slot) of every expert: its slot is the number of earlier experts stored in the same precision."""
    seen: dict[str, int] = {}
    slots = []
    for precision in precisions:
        slots.append((precision, seen.get(precision, 0)))
        seen[precision] = seen.get(precision, 0) + 1
    return slots


def quantize_experts(projection: str, weight: torch.Tensor, precisions: list[str] | tuple[str, ...],
                     group_size: int) -> dict[str, torch.Tensor]:
    """The stored tensors of ``projection`` (e.g. ``gate_up_proj``) of one layer: weight [E, out, in] -> names (relative
    to the experts module: ``gate_up_proj_int4``, ``gate_up_proj_int4_scale``, ``gate_up_proj``) -> tensors, expert e
    stored in ``precisions[e]``. Float experts keep ``weight``'s dtype."""
    if weight.dim() != 3 or weight.shape[0] != len(precisions):
        raise ValueError(f"{projection}: expected a [E={len(precisions)}, out, in] weight, got {tuple(weight.shape)}")
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise ValueError(f"{projection}: unknown precisions {unknown}, expected names from {PRECISIONS}")
    stored = {}
    for precision in PRECISIONS:
        members = [e for e, p in enumerate(precisions) if p == precision]
        if not members:
            continue
        part = weight[members]  # [n, out, in], slots in expert order
        if precision == FLOAT:
            stored[projection] = part.contiguous()
        else:
            stored[stored_name(projection, precision)], stored[scale_name(projection, precision)] = \
                QUANT_SCHEMES[precision].quantize(part, group_size)
    return stored


BLOCK_ELEMENTS = 1 << 20
"""Weights dequantised at a time by the kernel: a block of output rows of one expert's projection (4 MB in float32),
so running a quantised layer needs no float copy of a whole expert either."""


def _row_blocks(out_features: int, in_features: int) -> list[slice]:
    rows = max(1, BLOCK_ELEMENTS // in_features)
    return [slice(start, min(start + rows, out_features)) for start in range(0, out_features, rows)]


class _FrozenLinear(torch.autograd.Function):
    """x [n, in] -> x @ W^T [n, out] for one integer-stored expert projection W, which gets no gradient.

    W is dequantised block of output rows by block (:data:`BLOCK_ELEMENTS`), in the forward and again in the backward
    pass rather than kept for it, so training holds the integer experts only, not a float copy of every expert a
    batch used.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, experts: UpcycledQuantizedExperts, projection: str, expert: int) -> torch.Tensor:
        ctx.experts, ctx.projection, ctx.expert = experts, projection, expert
        blocks = _row_blocks(*experts.shapes[projection])
        if len(blocks) == 1:
            return F.linear(x, experts.weight(projection, expert, x.dtype))
        out = x.new_empty(x.shape[0], experts.shapes[projection][0])  # [n, out]
        for rows in blocks:
            out[:, rows] = F.linear(x, experts.weight(projection, expert, x.dtype, rows))  # [n, rows]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        experts, projection, expert = ctx.experts, ctx.projection, ctx.expert
        grad_x = None
        for rows in _row_blocks(*experts.shapes[projection]):
            part = grad[:, rows] @ experts.weight(projection, expert, grad.dtype, rows)  # [n, in]
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None, None, None


class UpcycledQuantizedExperts(nn.Module):
    """The E experts of MoE layer ``layer``, each stored in its precision from ``config.expert_precision`` (see the
    module doc for the tensors); computes what the float experts of ``config.expert_kind`` / ``expert_bias`` compute
    with the dequantised weights."""

    def __init__(self, config, act_fn: nn.Module, layer: int):
        super().__init__()
        precisions = config.expert_precision_of(layer)
        if precisions is None:
            raise ValueError(f"config.expert_precision has no entry for layer {layer}: its experts are not quantised")
        E, H, I = config.num_experts, config.get_text_config().hidden_size, config.expert_intermediate_size
        std = getattr(config.get_text_config(), "initializer_range", 0.02)
        self.num_experts, self.hidden_dim, self.intermediate_dim, self.layer = E, H, I, layer
        self.precisions, self.slots = tuple(precisions), expert_slots(precisions)
        self.group_size = config.expert_group_size
        self.has_gate, self.has_bias = config.expert_kind == "glu", bool(config.expert_bias)
        up_name = "gate_up_proj" if self.has_gate else "up_proj"
        self.shapes = {up_name: (2 * I if self.has_gate else I, H), "down_proj": (H, I)}  # [out, in] per projection
        counts = {p: self.precisions.count(p) for p in PRECISIONS if p in self.precisions}
        for name, (out_dim, in_dim) in self.shapes.items():
            for precision, count in counts.items():
                if precision == FLOAT:
                    setattr(self, name, nn.Parameter(torch.empty(count, out_dim, in_dim).normal_(std=std)))
                    continue
                scheme = QUANT_SCHEMES[precision]
                codes_shape, scale_shape = scheme.storage_shapes(out_dim, in_dim, self.group_size)
                self.register_buffer(stored_name(name, precision),
                                     torch.full((count, *codes_shape), scheme.zero_code(), dtype=scheme.codes_dtype))
                self.register_buffer(scale_name(name, precision), torch.ones(count, *scale_shape, dtype=SCALE_DTYPE))
            if self.has_bias:
                setattr(self, f"{name}_bias", nn.Parameter(torch.zeros(E, out_dim)))
        self.act_fn = act_fn
        self.config = config

    def weight(self, name: str, expert: int, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        """Expert ``expert``'s projection ``name`` [out, in] (or its output ``rows``) in ``dtype`` (dequantised; a float
        expert's own weight)."""
        precision, slot = self.slots[expert]
        if precision == FLOAT:
            return getattr(self, name)[slot, rows].to(dtype)
        codes = getattr(self, stored_name(name, precision))[slot, rows]
        scale = getattr(self, scale_name(name, precision))[slot, rows]
        return QUANT_SCHEMES[precision].dequantize(codes, scale, self.group_size, dtype)

    def dequantized(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Every expert's projection ``name``: [E, out, in] in ``dtype`` (the float experts' layout)."""
        return torch.stack([self.weight(name, expert, dtype) for expert in range(self.num_experts)])

    def _bias(self, name: str, expert: int) -> torch.Tensor | None:
        return getattr(self, f"{name}_bias")[expert] if self.has_bias else None

    def _project(self, name: str, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert ``expert``'s projection ``name`` of x [n, in] -> [n, out], its weight dequantised for this call."""
        if self.slots[expert][0] == FLOAT:
            out = F.linear(x, self.weight(name, expert, x.dtype))
        else:
            out = _FrozenLinear.apply(x, self, name, expert)
        bias = self._bias(name, expert)
        return out if bias is None else out + bias.to(out.dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """[T, H], [T, k], [T, k] -> [T, H] with the configured experts kernel: ``eager`` runs :meth:`reference`,
        anything else the quantised kernel (the 3-D kernels of float experts cannot read this layout)."""
        if getattr(self.config, "_experts_implementation", None) == "eager":
            return self.reference(hidden_states, top_k_index, top_k_weights)
        return quantized_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    def reference(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Eager reference: the whole layer dequantised to ``hidden_states.dtype``, then the float experts' eager loop.
        hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]."""
        weights = {name: self.dequantized(name, hidden_states.dtype) for name in self.shapes}  # [E, out, in] each

        def project(name: str, x: torch.Tensor, expert: int) -> torch.Tensor:
            bias = self._bias(name, expert)
            return F.linear(x, weights[name][expert], None if bias is None else bias.to(x.dtype))

        return eager_experts_loop(project, hidden_states, top_k_index, top_k_weights, num_experts=self.num_experts,
                                  act_fn=self.act_fn, has_gate=self.has_gate)


def quantized_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    """The quantised experts kernel (contract of an experts kernel): [T, H], [T, k], [T, k] -> [T, H].

    The S = T*k (token, slot) pairs are sorted by expert once; each selected expert then runs on its rows with its
    weights dequantised for that expert alone (never the whole layer); the outputs go back to (token, slot) order
    and are mixed by the routing weights. Computes in ``hidden_states.dtype``. Float experts modules (layers that
    ``config.expert_precision`` does not list, when this kernel is chosen for the whole model) run ``sorted_mm``.
    """
    if not isinstance(self, UpcycledQuantizedExperts):
        return sorted_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    T, k = top_k_index.shape
    _, inverse, token, ranges = _route(top_k_index, self.num_experts)
    if not ranges:  # no tokens
        return torch.zeros_like(hidden_states)
    x = hidden_states.index_select(0, token)  # [S, H], rows sorted by expert
    y = torch.empty_like(x)  # [S, H], each expert's rows written in place (no list of outputs and their concatenation)
    for expert, start, end in ranges:
        y[start:end] = expert_mlp(self._project, x[start:end], expert, self.act_fn, self.has_gate)
    y = y.index_select(0, inverse).view(T, k, -1)  # [T, k, H]
    return torch.bmm(top_k_weights.to(y.dtype).unsqueeze(1), y).squeeze(1)  # sum_j w[t, j] * y[t, j]


__all__ = ["FLOAT", "PRECISIONS", "QUANT_SCHEMES", "QuantScheme", "UpcycledQuantizedExperts", "check_group_size",
           "expert_slots", "quantize_experts", "quantized_experts_forward", "scale_name", "scheme_summary",
           "stored_name"]
