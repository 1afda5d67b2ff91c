"""Router kinds of the upcycled MoE block: one class per kind, picked by ``ROUTERS[config.router_type]``.

Every router holds ``weight`` [E, H], computes its logits in float32 and returns
``(selection scores [T, E], weights [T, k], indices [T, k])``: the selection scores are what top-k was taken
over, so load statistics and the balancing loss read the real assignment. What a kind means beyond its
forward (its default loss weights, the card's sentence, whether Mixtral-style native classes compute it) is
declared on the class, once. A new kind is one class here and one row in ``convert/routers.py``.

Part of the self-contained runtime folder (``trust_remote_code``): imports only ``torch`` and ``transformers``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init


class Router(nn.Module):
    """Base router: ``weight`` [E, H] initialised N(0, ``init_std``)."""

    kind: ClassVar[str]
    label: ClassVar[str]  # a few words for --help
    summary: ClassVar[str]  # one sentence for the model card
    # Default (load-balancing, z-loss) weights when the user gives none (Switch / ST-MoE values for softmax routers).
    aux_loss_coef: ClassVar[float] = 0.01
    z_loss_coef: ClassVar[float] = 0.001
    weights_sum_to_one: ClassVar[bool] = True  # the selected weights are renormalised
    balancing_bias: ClassVar[bool] = False  # holds ``e_score_correction_bias`` (auxiliary-loss-free balancing)
    default_bias_update_rate: ClassVar[float] = 0.0  # its speed gamma when the user gives none
    mixtral_compatible: ClassVar[bool] = False  # native Mixtral / Qwen-MoE routers compute exactly this

    def __init__(self, num_experts: int, hidden_size: int, top_k: int, init_std: float):
        super().__init__()
        self.num_experts, self.hidden_dim, self.top_k = num_experts, hidden_size, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=init_std)

    @property
    def router_type(self) -> str:
        return self.kind

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H] -> float32 logits [T, E]."""
        return F.linear(hidden_states.float(), self.weight.float())

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reset_buffers(self) -> None:
        """Initialise the buffers a checkpoint does not provide (none here)."""


class TopKRenormRouter(Router):
    """Mixtral: ``w = topk(softmax(x W^T)) / sum(topk(...))``. The weights sum to 1, so with every expert an exact
    copy of the dense MLP the block computes exactly what the dense MLP did."""

    kind = "topk_renorm"
    label = "Mixtral"
    summary = "softmax, top-k, weights renormalised to sum to 1 (Mixtral)"
    mixtral_compatible = True

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.logits(hidden_states)  # [T, E]
        top_weights, top_indices = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)  # [T, k]
        if self.weights_sum_to_one:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return logits, top_weights, top_indices


class SoftmaxTopKRouter(TopKRenormRouter):
    """Switch / GShard: ``w = topk(softmax(x W^T))`` without renormalisation; the selected weights sum to less than 1,
    which the converter compensates by scaling the experts (He et al. 2024, arXiv 2410.07524)."""

    kind = "softmax_topk"
    label = "no renormalisation, experts scaled"
    summary = ("softmax over all experts, top-k without renormalisation; routed experts scaled by E x G_r / k "
               "(He et al. 2024)")
    weights_sum_to_one = False
    mixtral_compatible = False


class SigmoidRouter(Router):
    """DeepSeek-V3 (arXiv 2412.19437, eq. 15-16): scores ``s = sigmoid(x W^T)``; experts chosen by ``topk(s + b)``
    with a per-expert bias ``b`` that only steers selection, and ``w = s_sel / sum(s_sel)``.

    ``b`` (buffer ``e_score_correction_bias``) is moved towards balance by :meth:`update_bias` (auxiliary-loss-free
    balancing, sec. 2.1.2); routed token counts since the last update are kept in ``tokens_per_expert``. Balance
    comes from the bias, so the default balance loss is DeepSeek-V3's tiny alpha = 1e-4 (ours is batch-wise, the
    paper's sequence-wise) and there is no z-loss (it bounds softmax logits).
    """

    kind = "sigmoid"
    label = "DeepSeek-V3, auxiliary-loss-free bias balancing"
    summary = ("sigmoid scores, top-k of score + balancing bias, selected scores renormalised; bias updated after "
               "every step (auxiliary-loss-free balancing, DeepSeek-V3)")
    aux_loss_coef = 1e-4
    z_loss_coef = 0.0
    balancing_bias = True
    default_bias_update_rate = 0.001  # DeepSeek-V3's gamma

    def __init__(self, num_experts: int, hidden_size: int, top_k: int, init_std: float):
        super().__init__(num_experts, hidden_size, top_k, init_std)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.float32), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(self.logits(hidden_states))  # [T, E]
        selection = scores + self.e_score_correction_bias.float()
        top_indices = torch.topk(selection, self.top_k, dim=-1).indices  # [T, k]
        top_weights = scores.gather(-1, top_indices)
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        if self.training:
            self.tokens_per_expert += torch.bincount(top_indices.reshape(-1), minlength=self.num_experts)
        return selection, top_weights, top_indices

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """``b_i += rate * sign(mean load - load_i)`` from the tokens routed since the last call, then reset.

        Overloaded experts become less likely to be chosen, underloaded ones more. Call once per optimizer step,
        after summing ``tokens_per_expert`` across processes.
        """
        load = self.tokens_per_expert
        if load.sum() > 0:
            self.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        load.zero_()

    def reset_buffers(self) -> None:
        """Zero the buffers a checkpoint did not provide (``init.zeros_`` skips loaded tensors)."""
        init.zeros_(self.tokens_per_expert)
        init.zeros_(self.e_score_correction_bias)


ROUTERS: dict[str, type[Router]] = {cls.kind: cls for cls in (TopKRenormRouter, SoftmaxTopKRouter, SigmoidRouter)}
ROUTER_TYPES: tuple[str, ...] = tuple(ROUTERS)

__all__ = ["ROUTERS", "ROUTER_TYPES", "Router", "SigmoidRouter", "SoftmaxTopKRouter", "TopKRenormRouter"]
