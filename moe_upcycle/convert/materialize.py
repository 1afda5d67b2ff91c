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
from tqdm.auto import tqdm
from transformers.dynamic_module_utils import custom_object_save

from ..card import parameter_counts, write_card
from ..checkpoint import (
    PlannedTensor,
    SafetensorsCheckpoint,
    atomic_folder,
    check_output,
    copy_side_files,
    parse_size,
    raw_config,
    read_config,
    write_sharded,
)
from ..errors import InvalidOptionError
from ..modeling.configuration_upcycled_moe import UpcycledMoeConfig
from .converter import UpcycleResult
from .plan import check_against_model

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
    plan = _plan(reader, config)
    config.expert_sharing, config.expert_lora_rank, config.expert_lora_alpha = "none", 0, 0.0
    config.expert_lora_targets = None
    config.upcycling = {**(config.upcycling or {}), "materialized_from": str(folder),
                        "reproduce": (config.upcycling or {}).get("reproduce")}
    meta_model = check_against_model(plan, config)
    total_bytes = sum(t.nbytes for t in plan)
    with atomic_folder(output, overwrite, [folder]) as tmp:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="Materializing", leave=False) as bar:
            shards = write_sharded(tmp, plan, parse_size(max_shard_size), bar.update)
        reader.close()
        custom_object_save(meta_model, tmp, config=config)
        config.save_pretrained(tmp)
        copy_side_files(folder, tmp)
        write_card(tmp, location=str(output))
        total, active = parameter_counts(tmp, config.num_experts, config.num_experts_per_tok)
    return UpcycleResult(output=output.resolve(), moe_layers=list(config.moe_layers), shards=shards, total_params=total,
                         active_params=active, bytes_written=total_bytes, seconds=time.perf_counter() - start)


__all__ = ["materialize"]
