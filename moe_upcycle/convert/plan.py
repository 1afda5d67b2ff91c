"""The conversion plan: every output tensor of the MoE checkpoint, its shape, and how to produce it.

Source tensor names are matched against the dense model's own state dict (built on the meta device, so
no memory is used) and the planned output is checked, name by name and shape by shape, against an
``UpcycledMoeForCausalLM`` built on the meta device: weight names are API.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from ..adapters import ArchitectureAdapter, ExpertTensor
from ..errors import CheckpointError
from ..modeling.configuration_upcycled_moe import UpcycledMoeConfig
from ..modeling.modeling_upcycled_moe import UpcycledMoeForCausalLM
from .diversity import diversify
from .options import UpcycleOptions
from .safetensors_io import PlannedTensor, SafetensorsCheckpoint

MOE_PREFIX = "model."  # UpcycledMoeForCausalLM keeps the dense causal LM under ``self.model``


@dataclass(frozen=True)
class DenseLayout:
    """Names and shapes of the dense model's state dict, and which names may be absent (tied)."""

    shapes: dict[str, tuple[int, ...]]
    tied_targets: frozenset[str]
    base_prefix: str
    ignore_unexpected: tuple[str, ...]
    renamings: tuple[WeightRenaming, ...]
    converters: tuple[WeightConverter, ...]


def dense_layout(config: PreTrainedConfig) -> DenseLayout:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    transforms = get_model_conversion_mapping(model)
    return DenseLayout(
        shapes=shapes,
        tied_targets=frozenset(model.all_tied_weights_keys),
        base_prefix=model.base_model_prefix,
        ignore_unexpected=tuple(model._keys_to_ignore_on_load_unexpected or ()),
        renamings=tuple(t for t in transforms if isinstance(t, WeightRenaming)),
        converters=tuple(t for t in transforms if isinstance(t, WeightConverter)),
    )


def match_source_keys(source: Iterable[str], layout: DenseLayout) -> dict[str, str]:
    """Map each dense model tensor name to the source checkpoint key holding it.

    Keys are renamed exactly as ``from_pretrained`` would: Transformers' own legacy renamings for the
    family (``embed_out`` -> ``lm_head`` for GPT-NeoX, ...) and an added or stripped base-model prefix
    (``h.0...`` vs ``transformer.h.0...`` for GPT-2). Raises :class:`CheckpointError` on unknown or
    missing tensors.
    """
    found: dict[str, str] = {}
    unexpected = []
    for key in source:
        name, converter = rename_source_key(
            key, list(layout.renamings), list(layout.converters), layout.base_prefix, layout.shapes
        )
        if converter is not None:
            raise CheckpointError(
                f"tensor {key} is stored in a legacy layout that needs conversion ({converter}); load the model "
                "with from_pretrained and save_pretrained it once, then upcycle the saved folder"
            )
        if name in layout.shapes:
            found[name] = key
        elif not any(re.search(pattern, key) for pattern in layout.ignore_unexpected):
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(
            f"the checkpoint has {len(unexpected)} tensor(s) its config does not describe, e.g. {unexpected[:3]}; "
            "check that config.json belongs to these weights"
        )
    missing = [n for n in layout.shapes if n not in found and n not in layout.tied_targets]
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} tensor(s) its config requires, e.g. {missing[:3]}; "
            "the download may be incomplete"
        )
    return found


def _check_shape(name: str, actual: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(actual) != tuple(expected):
        raise CheckpointError(f"tensor {name} has shape {list(actual)} but the config implies {list(expected)}")


class PlanBuilder:
    """Builds the ordered list of :class:`PlannedTensor` for one conversion."""

    def __init__(self, reader: SafetensorsCheckpoint, adapter: ArchitectureAdapter, config: PreTrainedConfig,
                 layers: list[int], options: UpcycleOptions):
        self.reader, self.adapter, self.config = reader, adapter, config
        self.layers, self.options = layers, options
        self.layout = dense_layout(config)
        self.keys = match_source_keys(reader.keys(), self.layout)
        for name, key in self.keys.items():
            _check_shape(key, reader.info[key].shape, self.layout.shapes[name])

    # -- tensor producers ------------------------------------------------------------------------
    def _dtype(self, source_dtype: torch.dtype) -> torch.dtype:
        wanted = self.options.torch_dtype
        return wanted if wanted is not None and source_dtype.is_floating_point else source_dtype

    def _copy(self, name: str) -> PlannedTensor:
        key = self.keys[name]
        info = self.reader.info[key]
        dtype = self._dtype(info.dtype)
        return PlannedTensor(MOE_PREFIX + name, dtype, info.shape, lambda: [self.reader.get(key).to(dtype)])

    def _expert(self, layer: int, spec: ExpertTensor) -> PlannedTensor:
        prefix = self.adapter.mlp_prefix(layer)
        keys = [self.keys[prefix + s] for s in spec.sources]
        shapes = [self.reader.info[k].shape for k in keys]
        if spec.transpose:
            shapes = [tuple(reversed(s)) for s in shapes]
        if any(s[1:] != shapes[0][1:] for s in shapes):
            raise CheckpointError(f"cannot concatenate {keys} with shapes {shapes}")
        per_expert = (sum(s[0] for s in shapes), *shapes[0][1:])
        dtype = self._dtype(self.reader.info[keys[0]].dtype)
        options, num_experts = self.options, self.options.num_experts

        def chunks():
            parts = [self.reader.get(k) for k in keys]
            if spec.transpose:
                parts = [p.t() for p in parts]
            base = torch.cat(parts, dim=0).to(dtype).contiguous()  # [out, in] of one expert
            drop, noise = options.drop_upcycling_ratio, options.expert_noise
            if drop == 0 and (noise == 0 or spec.is_bias):
                for _ in range(num_experts):
                    yield base
                return
            for expert in range(num_experts):
                yield diversify(base, spec.name, layer=layer, expert=expert, seed=options.seed, drop_ratio=drop,
                                noise=noise).to(dtype)

        name = f"{MOE_PREFIX}{prefix}experts.{spec.name}"
        return PlannedTensor(name, dtype, (num_experts, *per_expert), chunks)

    def _router(self, layer: int, dtype: torch.dtype) -> PlannedTensor:
        shape = (self.options.num_experts, self.config.hidden_size)
        seed, std = _seed(self.options.seed, layer, -1, "router"), self.options.router_init_std

        def chunks():
            generator = torch.Generator().manual_seed(seed)
            yield (torch.randn(shape, generator=generator) * std).to(dtype)

        return PlannedTensor(f"{MOE_PREFIX}{self.adapter.mlp_prefix(layer)}gate.weight", dtype, shape, chunks)

    # -- the plan --------------------------------------------------------------------------------
    def mlp_tensors(self, layer: int) -> set[str]:
        prefix = self.adapter.mlp_prefix(layer)
        return {n for n in self.layout.shapes if n.startswith(prefix)}

    def expert_intermediate_size(self) -> int:
        down = self._expert(self.layers[0], next(t for t in self.adapter.tensors if t.name == "down_proj"))
        return down.shape[-1]

    def build(self) -> list[PlannedTensor]:
        plan: list[PlannedTensor] = []
        prefixes = {self.adapter.mlp_prefix(i): i for i in self.layers}
        specs = self.adapter.expert_tensors(self.config)
        done: set[int] = set()
        for layer in self.layers:
            wanted = {self.adapter.mlp_prefix(layer) + s for spec in specs for s in spec.sources}
            present = self.mlp_tensors(layer)
            if wanted != present:
                raise CheckpointError(
                    f"layer {layer}'s MLP holds {sorted(present)} but the {self.config.model_type} adapter expects "
                    f"{sorted(wanted)}; this checkpoint's MLP layout is not supported"
                )
        for name in self.layout.shapes:
            layer = next((i for p, i in prefixes.items() if name.startswith(p)), None)
            if layer is not None:
                if layer not in done:
                    experts = [self._expert(layer, spec) for spec in specs]
                    plan.append(self._router(layer, experts[0].dtype))
                    plan.extend(experts)
                    done.add(layer)
            elif name in self.keys:
                plan.append(self._copy(name))
        return plan


def _seed(seed: int, layer: int, expert: int, what: str) -> int:
    return (seed * 1_000_003 + layer * 10_007 + (expert + 1) * 101 + sum(map(ord, what))) % (2**63)


def check_against_model(plan: list[PlannedTensor], moe_config: UpcycledMoeConfig) -> UpcycledMoeForCausalLM:
    """Raise if the planned names/shapes differ from ``UpcycledMoeForCausalLM(moe_config)``'s; return that meta model."""
    with torch.device("meta"):
        model = UpcycledMoeForCausalLM(moe_config)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    tied = set(model.all_tied_weights_keys)
    planned = {t.name: t.shape for t in plan}
    missing = [n for n in expected if n not in planned and n not in tied]
    extra = [n for n in planned if n not in expected]
    if missing or extra:
        raise CheckpointError(f"internal error: planned tensors differ from the model (missing {missing[:3]}, extra {extra[:3]})")
    for name, shape in planned.items():
        _check_shape(name, shape, expected[name])
    return model
