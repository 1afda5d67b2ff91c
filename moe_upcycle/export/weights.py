"""Map an upcycled checkpoint's tensors onto the native model's names and check them before writing.

Our checkpoint keeps the dense causal LM under ``model.``: ``model.model.layers.{i}.mlp.gate.weight`` [E, H]
(router), ``model.model.layers.{i}.mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first) and
``...experts.down_proj`` [E, H, I] — already the native fused layout, so exporting renames tensors and
streams them unchanged (expert tensors one expert at a time); only the target's :class:`ExtraTensor`s are new.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..convert.safetensors_io import PlannedTensor, SafetensorsCheckpoint
from ..errors import CheckpointError
from .errors import ExportError
from .targets import NativeTarget

OUTER_PREFIX = "model."
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")


def _read(reader: SafetensorsCheckpoint, key: str):
    """Chunks of source tensor ``key``: expert tensors [E, ...] one expert at a time, others whole."""
    info = reader.info[key]
    if len(info.shape) < 3 or info.nbytes == 0:
        return lambda: iter([reader.get(key)])
    rows = info.shape[0]
    step = info.nbytes // rows

    def chunks() -> Iterator[torch.Tensor]:
        with open(reader.folder / info.shard, "rb") as f:
            f.seek(info.offset)
            for _ in range(rows):
                buffer = bytearray(step)
                if f.readinto(buffer) != step:
                    raise CheckpointError(f"{reader.folder / info.shard} ended inside tensor {key!r}; copy it again")
                yield torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape[1:])

    return chunks


def _zeros(shape: tuple[int, ...], dtype: torch.dtype):
    def chunks() -> Iterator[torch.Tensor]:
        yield torch.zeros(shape, dtype=dtype)

    return chunks


def native_name(key: str, target: NativeTarget) -> str:
    """Our tensor name -> the native one, e.g. ``model.model.layers.0.mlp.gate.weight`` -> ``model.layers.0.mlp.gate.weight``."""
    if not key.startswith(OUTER_PREFIX):
        raise ExportError(f"tensor {key!r} is not under {OUTER_PREFIX!r}: this is not an UpcycledMoeForCausalLM checkpoint")
    name = key[len(OUTER_PREFIX):]
    for pattern, replacement in target.renames():
        name = re.sub(pattern, replacement, name)
    return name


def plan_native_tensors(reader: SafetensorsCheckpoint, target: NativeTarget, native: PreTrainedConfig) -> list[PlannedTensor]:
    """Every tensor of the native checkpoint, in source order; a tied ``lm_head`` copy is not written."""
    plan: list[PlannedTensor] = []
    for key in reader.keys():
        info = reader.info[key]
        name = native_name(key, target)
        if name == "lm_head.weight" and native.tie_word_embeddings:
            continue
        plan.append(PlannedTensor(name, info.dtype, info.shape, _read(reader, key)))
        router = _ROUTER.match(key[len(OUTER_PREFIX):])
        if router and target.extra_tensors:
            prefix = f"model.layers.{router.group(1)}.{target.moe_module}."
            experts, hidden = info.shape
            for extra in target.extra_tensors:
                shape = extra.shape(hidden, experts)
                plan.append(PlannedTensor(prefix + extra.name, info.dtype, shape, _zeros(shape, info.dtype)))
    return plan


def meta_model(native: PreTrainedConfig, target: NativeTarget) -> PreTrainedModel:
    """The native causal LM built on the meta device (no memory), to read its tensor names and shapes."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(native)]
    if model_class.__name__ != target.architecture:
        raise ExportError(f"Transformers maps {target.name!r} to {model_class.__name__}, expected {target.architecture}")
    with torch.device("meta"), warnings.catch_warnings():
        # A disabled shared expert (Qwen2-MoE) has zero-element weights; torch warns that initialising them is a no-op.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return model_class(native)


def check_against_native(plan: list[PlannedTensor], native: PreTrainedConfig, target: NativeTarget) -> None:
    """Raise :class:`ExportError` unless ``plan`` has exactly the native model's tensors, names and shapes."""
    model = meta_model(native, target)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = set(model.all_tied_weights_keys) if native.tie_word_embeddings else set()
    planned = {t.name: tuple(t.shape) for t in plan}
    if len(planned) != len(plan):
        raise ExportError("the checkpoint maps two tensors onto the same native name")
    missing = sorted(n for n in expected if n not in planned and n not in tied)
    extra = sorted(n for n in planned if n not in expected)
    if missing or extra:
        raise ExportError(f"the checkpoint's tensors do not match {target.architecture}: {len(missing)} missing "
                          f"{missing[:3]}, {len(extra)} unexpected {extra[:3]}; is the checkpoint complete and its "
                          "config.json the one it was saved with?")
    wrong = [f"{n} {list(s)} (expected {list(expected[n])})" for n, s in planned.items() if s != expected[n]]
    if wrong:
        raise ExportError(f"{len(wrong)} tensor(s) have the wrong shape for {target.architecture}: {'; '.join(wrong[:3])}")


__all__ = ["check_against_native", "meta_model", "native_name", "plan_native_tensors"]
