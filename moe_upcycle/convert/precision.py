"""``quantize --bits auto``: a precision per expert, chosen from how the model uses its experts on real text.

Mixed-precision experts (MC-MoE, Li et al. 2024, arXiv 2410.06270; its follow-up arXiv 2510.10962): experts that
take many tokens, or whose outputs move most when rounded, keep more bits. Measured on ``--data`` with the float
model, for every MoE layer l, expert e and candidate precision s (each scheme of ``QUANT_SCHEMES``, and the
model's float dtype):

    error[l, e, s] = sum over the (token, slot) pairs routed to e of  w^2 * ||expert_e(x; Q_s(W_e)) - expert_e(x; W_e)||^2

i.e. how much storing expert e in s changes the layer's output (w: the routing weight of the pair), summed over the
data: usage and sensitivity in one number. The allocation starts every expert at the floor, the most precise
precision the budget affords every expert (int4 at 5 bits with groups of 32, int2 at 3), and repeatedly makes the
upgrade that removes the most error per added bit, while the average over expert weights (integers and scales, or
float tensors, as :func:`~.quantize.average_bits` counts them) stays at most the target. Only the bits left over
are moved: no expert goes below the floor to pay for another's upgrade, since the measure, one layer at a time on
the calibration text, underrates what a coarse expert costs end to end (on the demo model, letting 8 rarely used
experts drop to int2 to pay for 5 int8 ones gave perplexity 143.33 against 142.88 for every expert in int4, at the
same 5 bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InvalidOptionError
from ..modeling.fast_experts import expert_mlp
from ..modeling.quantized_experts import FLOAT, QUANT_SCHEMES

Weights = dict[int, dict[str, tuple[int, int]]]  # MoE layer -> projection -> [out, in]


def storage_bits(scheme: str, out: int, in_features: int, group_size: int, float_bits: int) -> int:
    """Bits that one [out, in] projection of one expert takes in ``scheme`` (scales included)."""
    if scheme == FLOAT:
        return out * in_features * float_bits
    return sum(8 * t.dtype.itemsize * t.numel() for t in QUANT_SCHEMES[scheme].storage(out, in_features, group_size))


@dataclass
class PrecisionChoice:
    """The chosen precision of every expert and the measurement behind it."""

    precision: dict[str, list[str]]  # str(layer) -> one precision per expert
    candidates: list[str]  # precisions considered, cheapest first
    usage: torch.Tensor  # [L, E] (token, slot) pairs routed to each expert
    error: torch.Tensor  # [L, E, S] output change per candidate (see the module doc)
    target_bits: float
    data: str

    def record(self) -> dict:
        """What ``config.upcycling["quantized"]`` keeps of the choice."""
        return {"scheme": "auto", "target_bits": self.target_bits, "data": self.data, "candidates": self.candidates,
                "usage": {layer: row.tolist() for layer, row in zip(self.precision, self.usage.long(), strict=True)}}


def allocate(error: torch.Tensor, cost: torch.Tensor, budget: float) -> torch.Tensor:
    """Greedy allocation. ``error`` and ``cost`` (bits) are [L, E, S], candidates in ascending cost, and the cheapest
    fits the budget; returns the chosen candidate [L, E], whose total cost is at most ``budget``."""
    choice = torch.zeros(error.shape[:2], dtype=torch.long)  # [L, E]
    spent = cost[..., 0].sum().item()
    later = torch.arange(error.shape[-1])  # [S]
    while True:
        now = choice[..., None]  # [L, E, 1]
        gain = error.gather(-1, now) - error  # [L, E, S]: error removed by moving to each candidate
        extra = cost - cost.gather(-1, now)  # [L, E, S]: bits it adds
        valid = (later > now) & (gain > 0) & (extra > 0) & (extra <= budget - spent)
        ratio = torch.where(valid, gain / extra.clamp_min(1e-30), -1.0)
        best = ratio.argmax().item()
        if ratio.flatten()[best] <= 0:
            return choice
        layer, expert, up = torch.unravel_index(torch.tensor(best), ratio.shape)
        spent += extra[layer, expert, up].item()
        choice[layer, expert] = up


class _Sensitivity:
    """Forward hooks on every MoE layer's experts that accumulate usage [L, E] and error [L, E, S]."""

    def __init__(self, blocks: list[tuple[int, nn.Module]], candidates: list[str], group_size: int):
        self.candidates, self.group_size = candidates, group_size
        E = blocks[0][1].gate.num_experts
        self.usage = torch.zeros(len(blocks), E, dtype=torch.float64)
        self.error = torch.zeros(len(blocks), E, len(candidates), dtype=torch.float64)
        self.layers = [layer for layer, _ in blocks]
        self.handles = [block.experts.register_forward_hook(self._hook(i)) for i, (_, block) in enumerate(blocks)]

    def _expert(self, experts: nn.Module, expert: int, x: torch.Tensor, scheme: str, layer: int) -> torch.Tensor:
        """Expert ``expert`` of a float experts module on x [n, H] -> [n, H], its weights stored in ``scheme``."""

        def project(name: str, h: torch.Tensor, _: int) -> torch.Tensor:
            weight = getattr(experts, name)[expert]  # [out, in]
            if scheme != FLOAT:
                if not torch.isfinite(weight).all():
                    raise CheckpointError(f"layer {layer}'s experts {name} holds infinite or NaN values in expert "
                                          f"{expert}: they cannot be quantised; repair or retrain the model first")
                spec = QUANT_SCHEMES[scheme]
                weight = spec.dequantize(*spec.quantize(weight, self.group_size), self.group_size, weight.dtype)
            return F.linear(h, weight, getattr(experts, f"{name}_bias")[expert] if experts.has_bias else None)

        return expert_mlp(project, x, expert, experts.act_fn, experts.has_gate)

    def _hook(self, index: int):
        @torch.no_grad()
        def hook(experts: nn.Module, args: tuple, _output) -> None:
            hidden, top_k_index, top_k_weights = args[:3]  # [T, H], [T, k], [T, k]
            for expert in top_k_index.unique().tolist():
                token, slot = torch.where(top_k_index == expert)
                x, w2 = hidden[token], top_k_weights[token, slot].double() ** 2  # [n, H], [n]
                own = self._expert(experts, expert, x, FLOAT, self.layers[index])
                self.usage[index, expert] += len(token)
                for s, scheme in enumerate(self.candidates):
                    if scheme != FLOAT:
                        change = self._expert(experts, expert, x, scheme, self.layers[index]) - own  # [n, H]
                        self.error[index, expert, s] += (w2 * change.double().pow(2).sum(-1)).sum()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def choose_precision(folder: Path, data: str | Path, weights: Weights, *, num_experts: int, float_bits: int,
                     target_bits: float, group_size: int, block_size: int, max_tokens: int | None) -> PrecisionChoice:
    """Measure the float model in ``folder`` on ``data`` and choose a precision per expert (see the module doc);
    ``float_bits``: bits per weight of the checkpoint's experts as they are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..analysis import analyze, moe_blocks
    from ..train.sources import explained_loading

    candidates = _by_cost([*QUANT_SCHEMES, FLOAT], weights, group_size, float_bits)
    cost = torch.tensor([[[sum(storage_bits(s, *shape, group_size, float_bits) for shape in projections.values())
                           for s in candidates]] * num_experts
                         for projections in weights.values()], dtype=torch.float64)  # [L, E, S]
    numel = sum(num_experts * out * i for projections in weights.values() for out, i in projections.values())
    cheapest = cost[..., 0].sum().item() / numel
    if target_bits < cheapest:
        raise InvalidOptionError(f"--target-bits {target_bits} is below the smallest average this model can have "
                                 f"({cheapest:.3f} bits: every expert in {candidates[0]} with --group-size {group_size}); "
                                 "raise it or the group size")
    # The floor: the most precise scheme every expert can have within the budget; only the bits left over move.
    floor = max(s for s in range(len(candidates)) if cost[..., s].sum().item() <= target_bits * numel)
    candidates, cost = candidates[floor:], cost[..., floor:]
    with explained_loading(str(folder)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    sensitivity = _Sensitivity(moe_blocks(model), candidates, group_size)
    try:
        analyze(model, {"data": data}, tokenizer=tokenizer, block_size=block_size, max_tokens=max_tokens,
                data_label="--data {file}")
    finally:
        sensitivity.remove()
    choice = allocate(sensitivity.error, cost, target_bits * numel)
    precision = {str(layer): [candidates[c] for c in row] for layer, row in zip(weights, choice.tolist(), strict=True)}
    return PrecisionChoice(precision, candidates, sensitivity.usage, sensitivity.error, target_bits, str(data))


def _by_cost(schemes: list[str], weights: Weights, group_size: int, float_bits: int) -> list[str]:
    """``schemes`` cheapest first (bits of the first layer's projections)."""
    projections = next(iter(weights.values())).values()
    return sorted(schemes, key=lambda s: sum(storage_bits(s, *shape, group_size, float_bits) for shape in projections))


__all__ = ["PrecisionChoice", "allocate", "choose_precision", "storage_bits"]
