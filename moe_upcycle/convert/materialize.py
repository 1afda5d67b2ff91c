"""``moe-upcycle materialize IN OUT``: turn shared-weight LoRA experts into full experts.

Expert e's projection P becomes ``W_P + (alpha / r) B_{e,P} A_{e,P}`` as one [E, out, in] tensor (biases, shared,
repeated per expert), so the output is an ordinary upcycled checkpoint that ``moe-upcycle export`` maps to native
Mixtral / Qwen-MoE classes. Streaming: one expert's weight in memory at a time, computed in float32.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from ..checkpoint import (
    PlannedTensor,
    SafetensorsCheckpoint,
    check_output,
    parse_size,
    raw_config,
    read_config,
)
from ..errors import InvalidOptionError
from ..modeling.configuration_upcycled_moe import UpcycledMoeConfig
from .converter import UpcycleResult, check_source_tensors, checkpoint_task, upcycled_checkpoint

_BASE = re.compile(r"^(?P<prefix>.*\.experts\.)(?P<name>gate_up_proj|up_proj|down_proj)(?P<bias>_bias)?$")


def _plan(reader: SafetensorsCheckpoint, config: UpcycledMoeConfig) -> list[PlannedTensor]:
    E, scaling = config.num_experts, config.expert_lora_alpha / config.expert_lora_rank
    plan = []
    for key in reader.keys():
        info = reader.info[key]
        if "_lora_" in key:
            continue  # folded into the experts below
        match = _BASE.match(key)
        if match is None:
            plan.append(PlannedTensor(key, info.dtype, info.shape, lambda key=key: [reader.get(key)]))
            continue
        part = "down" if match["name"] == "down_proj" else "up"
        lora = f"{match['prefix']}deltas.{part}_lora_"
        if match["bias"] or lora + "A" not in reader.info:  # a bias, or a projection without delta: repeated
            plan.append(PlannedTensor(key, info.dtype, (E, *info.shape),
                                      lambda key=key: [reader.get(key)] * E))
            continue

        def experts(key=key, lora=lora, dtype=info.dtype):
            base, a, b = reader.get(key).float(), reader.get(lora + "A").float(), reader.get(lora + "B").float()
            for e in range(E):  # W + s B_e A_e, [out, in]
                yield torch.addmm(base, b[e], a[e], alpha=scaling).to(dtype)

        plan.append(PlannedTensor(key, info.dtype, (E, *info.shape), experts))
    return plan


def materialize(folder: str | Path, output: str | Path, *, overwrite: bool = False,
                max_shard_size: int | str = "5GB") -> UpcycleResult:
    """Write the full-experts twin of the shared-weight checkpoint ``folder`` to ``output`` (same logits)."""
    start = time.perf_counter()
    folder, output = Path(folder), Path(output)
    check_output(output, overwrite, [folder])
    raw = raw_config(folder, "an upcycled checkpoint")
    if raw.get("model_type") != UpcycledMoeConfig.model_type or raw.get("expert_sharing", "none") != "lora":
        raise InvalidOptionError(f"{folder} has no shared-weight experts (expert_sharing: lora), so there is nothing to "
                                 "materialize; its experts are already full tensors")
    config = read_config(folder, UpcycledMoeConfig, "an upcycled checkpoint")
    reader = SafetensorsCheckpoint(folder)
    check_source_tensors(reader, config, f"the shared-weight model that {folder / 'config.json'} describes")
    plan = _plan(reader, config)
    config.expert_sharing, config.expert_lora_rank, config.expert_lora_alpha = "none", 0, 0.0
    config.expert_lora_targets = None
    record = {**(config.upcycling or {}), "materialized_from": str(folder),
              "reproduce": (config.upcycling or {}).get("reproduce")}
    if any(reader.get(key).any() for key in reader.keys() if "_lora_B" in key):  # B starts at 0: exact until trained
        record["inexact_reasons"] = [*record.get("inexact_reasons", []), "the experts' low-rank deltas were trained "
                                     "before they were folded in, so the experts differ from the dense MLP"]
    config.upcycling = record
    with upcycled_checkpoint(output, plan, config, overwrite=overwrite, inputs=[folder], side_files_from=folder,
                             readers=[reader], max_shard_bytes=parse_size(max_shard_size), desc="Materializing",
                             task=checkpoint_task(config)) as (_, result):
        pass
    result.seconds = time.perf_counter() - start
    return result


__all__ = ["materialize"]
