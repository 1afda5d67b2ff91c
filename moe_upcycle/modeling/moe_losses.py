"""Auxiliary router losses of sparse Mixture-of-Experts models.

Part of the self-contained runtime folder (imports only ``torch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _token_mask(attention_mask: torch.Tensor | None, num_tokens: int, device: torch.device) -> torch.Tensor:
    """[T] float mask of real (non-padding) tokens, flattened in the router's [B*T] order."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.numel() != num_tokens:
        return torch.ones(num_tokens, device=device, dtype=torch.float32)
    return attention_mask.reshape(-1).to(device=device, dtype=torch.float32)


def expert_load(router_logits: torch.Tensor, top_k: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of (token, slot) assignments each expert receives, ``f_i``.

    Args:
        router_logits: [T, E] router logits of one layer.
        top_k: experts selected per token.
        attention_mask: optional [B, S] mask with ``B * S == T``; padding tokens are not counted.

    Returns:
        [E] float32 tensor summing to 1.
    """
    num_tokens, num_experts = router_logits.shape
    mask = _token_mask(attention_mask, num_tokens, router_logits.device)
    selected = router_logits.topk(top_k, dim=-1).indices  # [T, k]
    counts = F.one_hot(selected, num_experts).to(torch.float32).sum(dim=1)  # [T, E]
    counts = (counts * mask[:, None]).sum(dim=0)  # [E]
    return counts / counts.sum().clamp_min(1.0)


def load_balancing_loss(router_logits: torch.Tensor, top_k: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, arXiv 2101.03961, eq. 4).

    ``loss = E * sum_i f_i * P_i`` where ``f_i`` is the fraction of top-k assignments routed to
    expert i (no gradient) and ``P_i`` the mean router probability of expert i over real tokens.
    It equals 1 for perfectly uniform routing; Mixtral's ``load_balancing_loss_func`` gives ``top_k``
    times this value.

    Args:
        router_logits: [T, E] router logits of one layer.
        top_k: experts selected per token.
        attention_mask: optional [B, S] mask with ``B * S == T``.

    Returns:
        scalar float32 tensor.
    """
    num_tokens, num_experts = router_logits.shape
    mask = _token_mask(attention_mask, num_tokens, router_logits.device)
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    mean_probs = (probs * mask[:, None]).sum(dim=0) / mask.sum().clamp_min(1.0)  # [E]
    load = expert_load(router_logits.detach(), top_k, attention_mask)  # [E]
    return num_experts * torch.sum(load * mean_probs)


def router_z_loss(router_logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, arXiv 2202.08906, eq. 5): mean of ``logsumexp(logits)^2``.

    Args:
        router_logits: [T, E] router logits of one layer.
        attention_mask: optional [B, S] mask with ``B * S == T``.

    Returns:
        scalar float32 tensor.
    """
    mask = _token_mask(attention_mask, router_logits.shape[0], router_logits.device)
    z = torch.logsumexp(router_logits.float(), dim=-1) ** 2  # [T]
    return (z * mask).sum() / mask.sum().clamp_min(1.0)


class RoutingStats:
    """Routing statistics pooled over every token of the forward passes since the last :meth:`pop`.

    Per MoE layer: top-k assignments per expert, summed router probabilities, entropy and squared
    log-partition over real tokens. Pooling makes the reported load-balancing loss that of the whole
    logging window (``E * sum_i f_i * P_i`` with ``f`` and ``P`` over all its tokens), so it does not
    depend on how a batch was split into micro-batches. Everything is detached and accumulated on the
    logits' device (no host sync per forward); cost is O(T x E).
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.reset()

    FIELDS = ("counts", "prob_sums", "entropy_sums", "z_sums", "tokens")

    def reset(self, device: torch.device | str = "cpu") -> None:
        L, E = self.num_layers, self.num_experts
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.counts, self.prob_sums = zeros(L, E), zeros(L, E)
        self.entropy_sums, self.z_sums, self.tokens = zeros(L), zeros(L), zeros(L)

    @torch.no_grad()
    def update(self, router_logits: list[torch.Tensor], attention_mask: torch.Tensor | None) -> None:
        """Add one forward pass: ``router_logits`` holds one [T, E] tensor per MoE layer."""
        if router_logits and self.counts.device != router_logits[0].device:
            self.reset(router_logits[0].device)  # first use: move the (empty) accumulators to the logits' device
        for layer, logits in enumerate(router_logits):
            logits = logits.detach().float()
            mask = _token_mask(attention_mask, logits.shape[0], logits.device)[:, None]  # [T, 1]
            logp = torch.log_softmax(logits, dim=-1)
            probs = logp.exp()
            selected = F.one_hot(logits.topk(self.top_k, dim=-1).indices, self.num_experts).float().sum(1)  # [T, E]
            self.counts[layer] += (selected * mask).sum(0).double()
            self.prob_sums[layer] += (probs * mask).sum(0).double()
            self.entropy_sums[layer] += (-(probs * logp).sum(-1, keepdim=True) * mask).sum().double()
            self.z_sums[layer] += (torch.logsumexp(logits, -1, keepdim=True) ** 2 * mask).sum().double()
            self.tokens[layer] += mask.sum().double()

    def pop(self) -> dict[str, torch.Tensor] | None:
        """``{"load": [L, E] fractions, "counts", "entropy", "aux_loss", "z_loss": [L]}`` on the CPU, then reset."""
        device = self.counts.device
        counts, prob_sums, entropy_sums, z_sums, tokens = (getattr(self, f).cpu() for f in self.FIELDS)
        self.reset(device)
        if tokens.sum() == 0:
            return None
        tokens = tokens.clamp_min(1)
        load = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        return {
            "load": load,
            "counts": counts,
            "entropy": entropy_sums / tokens,
            "aux_loss": self.num_experts * (load * prob_sums / tokens[:, None]).sum(dim=1),
            "z_loss": z_sums / tokens,
        }
