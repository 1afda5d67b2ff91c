"""``moe-upcycle shrink MODEL OUT --num-experts N --data FILE [--method merge|prune]``: fewer experts per MoE layer.

Routing statistics come from running the model on ``--data`` (``moe_upcycle.analysis``): how many tokens each
expert receives (its usage f_e), and how alike two experts' router logits are over those tokens (cosine of the
logit columns). Then, in every MoE layer:

- ``prune`` keeps the N most used experts (their router rows too);
- ``merge`` (MC-SMoE, Li et al. 2024, arXiv 2310.01334): the N most used experts are dominant; every other expert
  joins the dominant whose router logits are most like its own; each group becomes one expert, the usage-weighted
  mean ``sum_e f_e W_e / sum_e f_e`` of its members' tensors (float32), routed by the dominant's router row.

Experts keep their original order, so N = E gives back the input. Streaming: one layer's experts tensor at a time.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from ..analysis import analyze
from ..checkpoint import PlannedTensor, SafetensorsCheckpoint, check_output, parse_size
from ..errors import InvalidOptionError
from ..modeling.modeling_upcycled_moe import DENSE_PREFIX
from .converter import UpcycleResult, checkpoint_task, read_float_experts, upcycled_checkpoint

METHODS = ("merge", "prune")


def routing_statistics(folder: Path, data: str | Path, *, block_size: int, max_tokens: int | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(usage [L, E]: tokens routed to each expert, similarity [L, E, E]: cosine of router logit columns)."""
    grams: list[torch.Tensor] = []

    def observe(router_logits: list[torch.Tensor]) -> None:
        for layer, logits in enumerate(router_logits):
            logits = logits.detach().double()
            if len(grams) <= layer:
                grams.append(torch.zeros(logits.shape[-1], logits.shape[-1], dtype=torch.float64))
            grams[layer] += logits.T @ logits

    report = analyze(folder, {"data": data}, block_size=block_size, max_tokens=max_tokens, observe=observe,
                     data_label="--data {file}")
    gram = torch.stack(grams)  # [L, E, E]
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(1e-30).sqrt()
    return report.counts[:, 0].double(), gram / (norms[:, :, None] * norms[:, None, :])


def groups(usage: torch.Tensor, similarity: torch.Tensor, keep: int, method: str) -> dict[int, list[int]]:
    """dominant expert -> the experts of one layer that become one new expert, in original order (usage [E],
    similarity [E, E]); the new experts are the dominants' in ascending order."""
    dominant = sorted(usage.argsort(descending=True, stable=True)[:keep].tolist())
    members = {d: [d] for d in dominant}
    if method == "merge":
        for expert in range(len(usage)):
            if expert not in members:
                members[max(dominant, key=lambda d: (similarity[expert, d].item(), -d))].append(expert)
    return {d: sorted(group) for d, group in members.items()}


def _combine(tensor_rows, group: list[int], usage: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The usage-weighted mean of the group's rows (a single member is copied as it is)."""
    if len(group) == 1:
        return tensor_rows(group[0])
    weights = usage[group].clamp_min(1e-6)  # an unused member still counts a little, never divides by zero
    total = sum(w.item() * tensor_rows(e).float() for e, w in zip(group, weights, strict=True))
    return (total / weights.sum().item()).to(dtype)


def shrink(folder: str | Path, output: str | Path, *, num_experts: int, data: str | Path, method: str = "merge",
           block_size: int = 256, max_tokens: int | None = 200_000, overwrite: bool = False,
           max_shard_size: int | str = "5GB") -> UpcycleResult:
    """Reduce every MoE layer of the upcycled model in ``folder`` to ``num_experts`` experts (see the module doc)."""
    start = time.perf_counter()
    folder, output = Path(folder), Path(output)
    if method not in METHODS:
        raise InvalidOptionError(f"method={method!r} is invalid: expected one of {', '.join(METHODS)}")
    check_output(output, overwrite, [folder, data])
    config = read_float_experts(folder, "shrink")
    max_shard_bytes = parse_size(max_shard_size)  # before the routing pass, not after it
    E = config.num_experts
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= E:
        raise InvalidOptionError(f"num_experts={num_experts!r} is invalid: expected an integer in [1, {E}] (the model "
                                 f"has {E} experts per layer)")
    usage, similarity = routing_statistics(folder, data, block_size=block_size, max_tokens=max_tokens)
    layer_groups = {layer: groups(usage[i], similarity[i], num_experts, method)
                    for i, layer in enumerate(config.moe_layers)}
    reader = SafetensorsCheckpoint(folder)
    pattern = re.compile(rf"^{re.escape(DENSE_PREFIX + config.decoder_layers_path)}\.(\d+)\."
                         rf"{re.escape(config.mlp_module_name)}\.(experts\.|gate\.)")
    plan = []
    for key in reader.keys():
        info, match = reader.info[key], pattern.match(key)
        if match is None or int(match[1]) not in layer_groups or info.shape[:1] != (E,):
            plan.append(PlannedTensor(key, info.dtype, info.shape, lambda key=key: [reader.get(key)]))
            continue
        chosen = layer_groups[int(match[1])]
        stats = usage[config.moe_layers.index(int(match[1]))]
        if match[2] == "gate.":  # the router: the dominant's row (or balancing-bias entry)
            plan.append(PlannedTensor(key, info.dtype, (num_experts, *info.shape[1:]),
                                      lambda key=key, rows=list(chosen): [reader.get(key)[rows]]))
            continue

        def experts(key=key, chosen=chosen, stats=stats, dtype=info.dtype):
            tensor = reader.get(key)  # [E, ...]: one layer's experts tensor
            for group in chosen.values():
                yield _combine(lambda e: tensor[e], group, stats, dtype)

        plan.append(PlannedTensor(key, info.dtype, (num_experts, *info.shape[1:]), experts))
    record = dict(config.upcycling or {})
    record["shrunk"] = {"from_experts": E, "to_experts": num_experts, "method": method, "data": str(data),
                        "groups": {str(layer): list(g.values()) for layer, g in layer_groups.items()}}
    if num_experts < E:
        record["inexact_reasons"] = [*record.get("inexact_reasons", []),
                                     f"{method} reduced the experts from {E} to {num_experts} per layer"]
    config.num_experts, config.num_experts_per_tok = num_experts, min(config.num_experts_per_tok, num_experts)
    config.upcycling = record
    with upcycled_checkpoint(output, plan, config, overwrite=overwrite, inputs=[folder, data], side_files_from=folder,
                             readers=[reader], max_shard_bytes=max_shard_bytes, desc="Shrinking",
                             task=checkpoint_task(config)) as (_, result):
        pass
    result.seconds = time.perf_counter() - start
    return result


__all__ = ["METHODS", "groups", "routing_statistics", "shrink"]
