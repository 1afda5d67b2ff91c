"""``export_native()``: stream an upcycled checkpoint into its native Transformers MoE twin.

The output loads with stock ``AutoModelForCausalLM.from_pretrained(output)`` on a machine without
``moe_upcycle``: a native config (no ``auto_map``), native tensor names, no custom code files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedConfig

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
from ..modeling.configuration_upcycled_moe import UpcycledMoeConfig
from .dequantize import DequantizedCheckpoint
from .errors import ExportError
from .native_config import build_native_config
from .resolve import explain_mismatch, resolve_target
from .targets import NativeTarget
from .weights import check_against_native, plan_native_tensors


@dataclass
class ExportResult:
    """What an export produced."""

    output: Path
    target: str
    architecture: str
    source_family: str
    shards: list[str]
    num_tensors: int
    bytes_written: int
    seconds: float
    copied_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the command line."""
        return (f"exported {self.source_family} MoE to {self.output} as {self.architecture} in {self.seconds:.1f}s: "
                f"{self.num_tensors} tensors, {len(self.shards)} shard(s), {self.bytes_written / 1e9:.3f} GB")


def load_upcycled_config(folder: Path) -> UpcycledMoeConfig:
    """The ``UpcycledMoeConfig`` of ``folder``; raises if it is missing or belongs to another model type."""
    model_type = raw_config(folder, "an upcycled checkpoint").get("model_type")
    if model_type != UpcycledMoeConfig.model_type:
        raise ExportError(f"{folder} is a {model_type!r} checkpoint, not an upcycled one "
                          f"({UpcycledMoeConfig.model_type!r}): export_native converts the output of `moe-upcycle convert` "
                          "(or of merge/train)")
    return read_config(folder, UpcycledMoeConfig, "an upcycled checkpoint")


def _notes(config: UpcycledMoeConfig, target: NativeTarget, native: PreTrainedConfig) -> list[str]:
    notes = []
    if config.router_z_loss_coef > 0:
        notes.append(f"router_z_loss_coef={config.router_z_loss_coef} has no {target.label} counterpart (training only): dropped")
    if config.router_jitter_noise > 0 and not hasattr(native, "router_jitter_noise"):
        notes.append(f"router_jitter_noise={config.router_jitter_noise} has no {target.label} counterpart (training only): dropped")
    notes.append(f"{target.label} adds router_aux_loss_coef * aux_loss only with output_router_logits=True; "
                 "set it in the config to keep the load-balancing loss when fine-tuning")
    return notes


def export_native(
    folder: str | Path,
    output: str | Path,
    to: str = "auto",
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    dequantize: bool = False,
) -> ExportResult:
    """Export the upcycled checkpoint in ``folder`` to the native Transformers MoE class ``to`` in ``output``.

    ``to="auto"`` picks the exact twin of the source family (llama/mistral -> mixtral, qwen2 -> qwen2_moe,
    qwen3 -> qwen3_moe, olmo2 -> flex_olmo, granite -> granitemoe; a LLaVA-style VLM keeps its class with the
    language model's twin as text config, qwen3_vl -> qwen3_vl_moe). Every check — target, family, layers,
    config fields, each tensor's name and shape against the native model built on the meta device — runs
    before anything is written; a refusal raises :class:`ExportError` saying why. The output appears at once
    on success (tokenizer and generation config copied; no ``auto_map``, no code files). Quantised experts
    (``moe-upcycle quantize``) are refused unless ``dequantize``: then their dequantised values are written, in the
    float dtype they were quantised from.
    """
    start = time.perf_counter()
    folder, output = Path(folder), Path(output)
    max_shard_bytes = parse_size(max_shard_size)
    check_output(output, overwrite, [folder])
    config = load_upcycled_config(folder)
    family = config.get_text_config().model_type  # a vision-language model's language model
    target = resolve_target(family, to)
    reason = explain_mismatch(config, target, dequantize)
    if reason is not None:
        raise ExportError(f"cannot export this {family} checkpoint to {target.label} ({target.architecture}) exactly: {reason}")
    native = build_native_config(config, target)
    reader = SafetensorsCheckpoint(folder)
    if config.expert_precision:
        quantized = (config.upcycling or {}).get("quantized") or {}
        reader = DequantizedCheckpoint(reader, config, getattr(torch, quantized.get("float_dtype", "float32")))
    try:
        plan: list[PlannedTensor] = plan_native_tensors(reader, target, native, config.decoder_layers_path)
        check_against_native(plan, native, target)
        with atomic_folder(output, overwrite, [folder]) as tmp:
            shards = write_sharded(tmp, plan, max_shard_bytes)
            native.save_pretrained(tmp)
            copied = copy_side_files(folder, tmp)
    finally:
        reader.close()
    return ExportResult(
        output=output.resolve(), target=target.name, architecture=native.architectures[0], source_family=family,
        shards=shards, num_tensors=len(plan), bytes_written=sum(t.nbytes for t in plan),
        seconds=time.perf_counter() - start, copied_files=copied, notes=_notes(config, target, native),
    )


__all__ = ["ExportResult", "export_native", "load_upcycled_config"]
