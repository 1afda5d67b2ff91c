"""Experts that share one frozen dense MLP, each with its own low-rank delta (MixLoRA, Li et al. 2024,
arXiv 2404.15159; PESC, Wu et al. 2024, arXiv 2401.02731).

Expert e computes the dense MLP's function with every adapted projection P replaced by
``W_P + s * B_{e,P} @ A_{e,P}``, ``s = alpha / r``. Tensors (one layer):

- shared base, as the dense MLP holds it: ``gate_up_proj`` [2I, H] (gate rows, then up) or ``up_proj`` [I, H];
  ``down_proj`` [H, I]; biases ``<name>_bias`` [out] when the family has them;
- per adapted projection (``up``: the first, ``down``: the second), in the child module ``deltas`` (what training
  changes, saved on its own by PEFT's ``modules_to_save``): ``deltas.<p>_lora_A`` [E, r, in], ``deltas.<p>_lora_B``
  [E, out, r]. B starts at zero (PEFT's initialisation), so a converted model is exactly the dense one.

:meth:`reference` is the eager reference (one loop over active experts, each projection taken per expert);
:func:`shared_lora_experts_forward`, registered as the experts kernel ``shared_lora``, is the fast path: the frozen
base projections run once per token, not once per selected expert: the up projection because it does not depend
on the expert, and the down projection because it is linear, ``sum_k w_k (W h_k + b) = W (sum_k w_k h_k) +
b sum_k w_k``. Only the rank-r parts run per (token, expert).

Part of the self-contained runtime folder: imports only ``torch``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ExpertDeltas(nn.Module):
    """The low-rank deltas of E experts: ``<p>_lora_A`` [E, r, in] (nn.Linear's initialisation, as PEFT's LoRA A)
    and ``<p>_lora_B`` [E, out, r] (zero) for each projection ``p`` in ``shapes`` (name -> [out, in])."""

    def __init__(self, num_experts: int, rank: int, shapes: dict[str, tuple[int, int]]):
        super().__init__()
        for part, (out_dim, in_dim) in shapes.items():
            lora_a = torch.empty(num_experts, rank, in_dim)
            for e in range(num_experts):
                nn.init.kaiming_uniform_(lora_a[e], a=math.sqrt(5))
            setattr(self, f"{part}_lora_A", nn.Parameter(lora_a))
            setattr(self, f"{part}_lora_B", nn.Parameter(torch.zeros(num_experts, out_dim, rank)))


class UpcycledLoraExperts(nn.Module):
    """E experts over one shared MLP: ``down_e(act(gate_e(x)) * up_e(x))`` or ``down_e(act(up_e(x)))``."""

    def __init__(self, config, act_fn: nn.Module):
        super().__init__()
        E, H, I = config.num_experts, config.get_text_config().hidden_size, config.expert_intermediate_size
        r = config.expert_lora_rank
        std = getattr(config.get_text_config(), "initializer_range", 0.02)
        self.num_experts, self.hidden_dim, self.intermediate_dim, self.rank = E, H, I, r
        self.scaling = config.expert_lora_alpha / r
        self.has_gate, self.has_bias = config.expert_kind == "glu", bool(config.expert_bias)
        self.up_name = "gate_up_proj" if self.has_gate else "up_proj"
        up_dim = 2 * I if self.has_gate else I
        self.shapes = {"up": (up_dim, H), "down": (H, I)}  # [out, in] of each projection
        for part, (out_dim, in_dim) in self.shapes.items():
            name = self.projection(part)
            setattr(self, name, nn.Parameter(torch.empty(out_dim, in_dim).normal_(std=std)))
            if self.has_bias:
                setattr(self, f"{name}_bias", nn.Parameter(torch.zeros(out_dim)))
        self.targets = tuple(config.expert_lora_targets)
        self.deltas = ExpertDeltas(E, r, {part: self.shapes[part] for part in self.targets})
        self.act_fn = act_fn
        self.config = config

    def projection(self, part: str) -> str:
        return self.up_name if part == "up" else "down_proj"

    def base(self, part: str, x: torch.Tensor) -> torch.Tensor:
        """The shared projection: x [N, in] -> [N, out]."""
        name = self.projection(part)
        return F.linear(x, getattr(self, name), getattr(self, f"{name}_bias") if self.has_bias else None)

    def delta(self, part: str, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert ``expert``'s low-rank change of projection ``part``: s * (x A_e^T) B_e^T, x [N, in] -> [N, out]."""
        a, b = getattr(self.deltas, f"{part}_lora_A")[expert], getattr(self.deltas, f"{part}_lora_B")[expert]
        return F.linear(F.linear(x, a), b) * self.scaling

    def activate(self, up: torch.Tensor) -> torch.Tensor:
        """[N, 2I] (gate, up) or [N, I] -> [N, I]."""
        if self.has_gate:
            gate, up = up.chunk(2, dim=-1)
            return self.act_fn(gate) * up
        return self.act_fn(up)

    def expert(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert ``expert`` on x [N, H] -> [N, H], its projections taken one by one (the reference)."""
        up = self.base("up", x) + (self.delta("up", x, expert) if "up" in self.targets else 0)
        h = self.activate(up)
        return self.base("down", h) + (self.delta("down", h, expert) if "down" in self.targets else 0)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """[T, H], [T, k], [T, k] -> [T, H] with the configured experts kernel: ``eager`` runs :meth:`reference`,
        anything else the shared-weight kernel (the 3-D kernels of full experts do not apply to this layout)."""
        if getattr(self.config, "_experts_implementation", None) == "eager":
            return self.reference(hidden_states, top_k_index, top_k_weights)
        return shared_lora_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    def reference(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Eager reference. hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]."""
        final = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == expert)
            out = self.expert(hidden_states[token], expert) * top_k_weights[token, slot, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final


def shared_lora_experts_forward(self: UpcycledLoraExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                top_k_weights: torch.Tensor) -> torch.Tensor:
    """The shared-weight kernel (contract of an experts kernel): [T, H], [T, k], [T, k] -> [T, H].

    The shared up projection runs once on the T tokens, the shared down projection once on the routing-weighted
    sum of the k activations. The rank-r parts of all E experts are stacked into one [E*r, in] matrix A and one
    [E*r, out] matrix B, so each slot's delta is two dense matmuls through the E*r-wide bottleneck with the
    columns of the unselected experts zeroed: no sort, no gather or scatter of [T*k, I] activations, and for
    r*E much smaller than I the bottleneck costs a fraction of the shared projections (scripts/bench_shared_experts.py).
    """
    T, k = top_k_index.shape
    E, r, s = self.num_experts, self.rank, self.scaling
    weights = top_k_weights.to(hidden_states.dtype)
    deltas = self.deltas
    up = self.base("up", hidden_states)  # [T, U]
    if "up" in self.targets:
        a_up = F.linear(hidden_states, deltas.up_lora_A.reshape(E * r, -1)).view(T, E, r)  # [T, E, r]
        b_up = deltas.up_lora_B.transpose(1, 2).reshape(E * r, -1)  # [E*r, U]
    if "down" in self.targets:
        a_down = deltas.down_lora_A.reshape(E * r, -1)  # [E*r, I]
        bottleneck = 0
    mixed = 0
    for slot in range(k):
        chosen = F.one_hot(top_k_index[:, slot], E).to(hidden_states.dtype)[:, :, None]  # [T, E, 1]
        up_slot = up if "up" not in self.targets else torch.addmm(up, (a_up * chosen).reshape(T, E * r), b_up, alpha=s)
        h = self.activate(up_slot)  # [T, I]
        weight = weights[:, slot, None]  # [T, 1]
        mixed = h * weight if slot == 0 else torch.addcmul(mixed, h, weight)
        if "down" in self.targets:
            bottleneck = bottleneck + F.linear(h, a_down).view(T, E, r) * (chosen * weight[:, :, None])
    out = F.linear(mixed, self.down_proj)  # [T, H]
    if self.has_bias:
        out = out + self.down_proj_bias * weights.sum(dim=-1, keepdim=True)
    if "down" in self.targets:
        out = torch.addmm(out, bottleneck.reshape(T, E * r), deltas.down_lora_B.transpose(1, 2).reshape(E * r, -1), alpha=s)
    return out


__all__ = ["ExpertDeltas", "UpcycledLoraExperts", "shared_lora_experts_forward"]
