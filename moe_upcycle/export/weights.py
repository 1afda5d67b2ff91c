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
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from ..checkpoint import PlannedTensor, SafetensorsCheckpoint, check_planned
from ..modeling.modeling_upcycled_moe import DENSE_PREFIX
from .errors import ExportError
from .targets import NativeTarget


def _zeros(shape: tuple[int, ...], dtype: torch.dtype):
    def chunks() -> Iterator[torch.Tensor]:
        yield torch.zeros(shape, dtype=dtype)

    return chunks


def native_name(key: str, target: NativeTarget, layers_path: str = "model.layers") -> str:
    """Our tensor name -> the native one, e.g. ``model.model.layers.0.mlp.gate.weight`` -> ``model.layers.0.mlp.gate.weight``
    (``layers_path``: the dense model's decoder layers, our config's ``decoder_layers_path``)."""
    if not key.startswith(DENSE_PREFIX):
        raise ExportError(f"tensor {key!r} is not under {DENSE_PREFIX!r}: this is not an UpcycledMoeForCausalLM checkpoint")
    name = key[len(DENSE_PREFIX):]
    for pattern, replacement in target.renames(layers_path):
        name = re.sub(pattern, replacement, name)
    return name


def plan_native_tensors(reader: SafetensorsCheckpoint, target: NativeTarget, native: PreTrainedConfig,
                        layers_path: str = "model.layers") -> list[PlannedTensor]:
    """Every tensor of the native checkpoint, in source order; a tied ``lm_head`` copy is not written."""
    plan: list[PlannedTensor] = []
    router_name = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.mlp\.gate\.weight$")
    for key in reader.keys():
        info = reader.info[key]
        name = native_name(key, target, layers_path)
        if name == "lm_head.weight" and native.tie_word_embeddings:
            continue
        plan.append(PlannedTensor(name, info.dtype, info.shape, lambda key=key: reader.iter_rows(key)))
        router = router_name.match(key[len(DENSE_PREFIX):])
        if router and target.extra_tensors:
            prefix = f"{layers_path}.{router.group(1)}.{target.moe_module}."
            experts, hidden = info.shape
            for extra in target.extra_tensors:
                shape = extra.shape(hidden, experts)
                plan.append(PlannedTensor(prefix + extra.name, info.dtype, shape, _zeros(shape, info.dtype)))
    return plan


def meta_model(native: PreTrainedConfig, target: NativeTarget) -> PreTrainedModel:
    """The native causal LM (or vision-language model) built on the meta device (no memory), to read its tensor names
    and shapes."""
    if native.get_text_config() is not native:
        model_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(native)]
    else:
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
    tied = set(model.all_tied_weights_keys) if native.tie_word_embeddings else set()
    check_planned(plan, model, type(model).__name__, ExportError, tied=tied)


__all__ = ["check_against_native", "meta_model", "native_name", "plan_native_tensors"]
