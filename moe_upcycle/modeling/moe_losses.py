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


def routing_entropy(router_logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy (nats) of the router's softmax distribution over real tokens; scalar float32."""
    mask = _token_mask(attention_mask, router_logits.shape[0], router_logits.device)
    logp = torch.log_softmax(router_logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)  # [T]
    return (entropy * mask).sum() / mask.sum().clamp_min(1.0)
