"""The conversion plan: every output tensor of the MoE checkpoint, its shape, and how to produce it.

Source tensor names are matched against the dense model's own state dict (built on the meta device, so
no memory is used) and the planned output is checked, name by name and shape by shape, against an
``UpcycledMoeForCausalLM`` built on the meta device: weight names are API.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from ..adapters import ArchitectureAdapter, ExpertTensor
from ..adapters.base import Task
from ..checkpoint import PlannedTensor, SafetensorsCheckpoint, check_planned
from ..errors import CheckpointError, InvalidOptionError
from ..modeling.configuration_upcycled_moe import UpcycledMoeConfig
from ..modeling.modeling_upcycled_moe import (
    DENSE_PREFIX,
    UpcycledMoeForCausalLM,
    UpcycledMoeForImageTextToText,
    UpcycledMoeModel,
    UpcycledMoePreTrainedModel,
)
from ..modeling.routers import ROUTERS
from .diversity import diversify, seeded_generator, slice_neurons
from .options import UpcycleOptions


@dataclass(frozen=True)
class DenseLayout:
    """Names and shapes of the dense model's state dict, and which names may be absent (tied)."""

    shapes: dict[str, tuple[int, ...]]
    tied_targets: frozenset[str]
    base_prefix: str
    ignore_unexpected: tuple[str, ...]
    nonpersistent_buffers: frozenset[str]
    renamings: tuple[WeightRenaming, ...]
    converters: tuple[WeightConverter, ...]


# Per task: the Auto class of the dense model, and the upcycled class a converted checkpoint is checked against
# (the encoder's heads load the same checkpoint).
DENSE_AUTO_CLASSES = {"causal_lm": AutoModelForCausalLM, "encoder": AutoModel,
                      "image_text_to_text": AutoModelForImageTextToText}
MOE_CLASSES: dict[str, type[UpcycledMoePreTrainedModel]] = {
    "causal_lm": UpcycledMoeForCausalLM, "encoder": UpcycledMoeModel, "image_text_to_text": UpcycledMoeForImageTextToText}


def dense_layout(config: PreTrainedConfig, task: Task = "causal_lm") -> DenseLayout:
    """The state-dict layout of the dense model of ``task`` (:data:`DENSE_AUTO_CLASSES`)."""
    try:
        with torch.device("meta"):
            model = DENSE_AUTO_CLASSES[task].from_config(config)
    except Exception as err:  # noqa: BLE001 (a config value of the wrong kind fails anywhere in the model's __init__)
        raise CheckpointError(f"the {config.model_type} config cannot build its model ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:300]}); fix or re-download config.json") from None
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    transforms = get_model_conversion_mapping(model)
    return DenseLayout(
        shapes=shapes,
        tied_targets=frozenset(model.all_tied_weights_keys),
        base_prefix=model.base_model_prefix,
        ignore_unexpected=tuple(model._keys_to_ignore_on_load_unexpected or ()),
        # older checkpoints store buffers that are not persistent any more (BERT's ``position_ids``): from_pretrained
        # skips them, and so does the converter
        nonpersistent_buffers=frozenset(name for name, _ in model.named_buffers() if name not in shapes),
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
        elif name not in layout.nonpersistent_buffers and not any(re.search(pattern, key) for pattern in layout.ignore_unexpected):
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


@dataclass(frozen=True)
class ExpertSource:
    """Where one expert copy's MLP comes from when experts are mixed from several models (mergekit-moe's keys)."""

    source: int = 0  # index of the checkpoint in PlanBuilder.readers
    noise_scale: float = 0.0  # std of absolute Gaussian noise added to every tensor of the expert
    residual_scale: float = 1.0  # factor on what the expert writes to the residual stream (its down projection)


class PlanBuilder:
    """Builds the ordered list of :class:`PlannedTensor` for one conversion.

    Upcycling reads one checkpoint. Mixing (Branch-Train-MiX, mergekit-moe) passes more: ``others`` are further
    checkpoints of the same architecture, ``experts`` says which one each expert copy [E / G_r] comes from,
    ``nonexpert`` whether the other tensors come from ``reader`` (``base``) or are the float32 mean of the
    experts' checkpoints (``average``), and ``shared`` an always-on shared expert made of one checkpoint's MLP.
    """

    def __init__(self, reader: SafetensorsCheckpoint, adapter: ArchitectureAdapter, config: PreTrainedConfig,
                 layers: list[int], options: UpcycleOptions, router_rows: dict[int, torch.Tensor] | None = None, *,
                 others: Sequence[SafetensorsCheckpoint] = (), experts: Sequence[ExpertSource] | None = None,
                 nonexpert: str = "base", shared: ExpertSource | None = None):
        """``router_rows``: per MoE layer, one router row per expert copy [E / G_r, H] (data initialisation)."""
        self.reader, self.adapter, self.config = reader, adapter, config
        self.layers, self.options, self.router_rows = layers, options, router_rows
        self.readers = [reader, *others]
        copies = options.num_experts // options.routed_slices
        self.experts = list(experts) if experts is not None else [ExpertSource()] * copies
        if len(self.experts) != copies:
            raise ValueError(f"{len(self.experts)} expert sources for {copies} expert copies")
        self.nonexpert, self.shared = nonexpert, shared
        self._last_loaded: tuple[tuple | None, torch.Tensor | None] = (None, None)
        self.layout = dense_layout(config, adapter.task)
        self.source_keys = [match_source_keys(r.keys(), self.layout) for r in self.readers]
        self.keys = self.source_keys[0]
        for reader_, keys in zip(self.readers, self.source_keys, strict=True):
            if keys.keys() != self.keys.keys():
                raise CheckpointError(f"{reader_.folder} holds other tensors than {reader.folder}: "
                                      f"{sorted(keys.keys() ^ self.keys.keys())[:3]}")
            for name, key in keys.items():
                shape = tuple(reader_.info[key].shape)
                if reader_ is not reader and shape != self.layout.shapes[name]:  # the base's tensors were checked first
                    raise CheckpointError(f"{reader_.folder} has tensor {key} of shape {list(shape)} but {reader.folder} "
                                          f"has {list(self.layout.shapes[name])}; mix needs models of one architecture")
                _check_shape(key, shape, self.layout.shapes[name])

    # -- tensor producers ------------------------------------------------------------------------
    def _dtype(self, source_dtype: torch.dtype) -> torch.dtype:
        wanted = self.options.torch_dtype
        return wanted if wanted is not None and source_dtype.is_floating_point else source_dtype

    def _copy(self, name: str) -> PlannedTensor:
        key = self.keys[name]
        info = self.reader.info[key]
        dtype = self._dtype(info.dtype)
        averaged = sorted({e.source for e in self.experts})
        if self.nonexpert == "average" and len(averaged) > 1 and info.dtype.is_floating_point:
            def mean() -> list[torch.Tensor]:  # a float32 running sum, one source tensor in memory at a time
                total = torch.zeros(info.shape, dtype=torch.float32)
                for source in averaged:
                    total += self.readers[source].get(self.source_keys[source][name]).float()
                return [(total / len(averaged)).to(dtype)]

            return PlannedTensor(DENSE_PREFIX + name, dtype, info.shape, mean)
        return PlannedTensor(DENSE_PREFIX + name, dtype, info.shape, lambda: [self.reader.get(key).to(dtype)])

    def _dense(self, layer: int, spec: ExpertTensor,
               source: int = 0) -> tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]:
        """(shape [out, in] or [out], dtype, loader) of the dense tensor that ``spec`` fuses, in [out, in] layout,
        read from checkpoint ``source``."""
        reader, prefix = self.readers[source], self.adapter.source_prefix(layer)
        keys = [self.source_keys[source][prefix + s] for s in spec.sources]
        shapes = [reader.info[k].shape for k in keys]
        if spec.transpose:
            shapes = [tuple(reversed(s)) for s in shapes]
        if any(s[1:] != shapes[0][1:] for s in shapes):
            raise CheckpointError(f"cannot concatenate {keys} with shapes {shapes}")
        dtype = self._dtype(reader.info[keys[0]].dtype)

        def load() -> torch.Tensor:
            cached_keys, cached = self._last_loaded
            if cached_keys == (source, *keys):
                return cached
            self._last_loaded = (None, None)  # never hold two dense tensors at once
            parts = [reader.get(k) for k in keys]
            if spec.transpose:
                parts = [p.t() for p in parts]
            tensor = torch.cat(parts, dim=0).to(dtype).contiguous()
            if self.options.shared_experts:  # the shared expert, planned right after the routed one, reads it again
                self._last_loaded = ((source, *keys), tensor)
            return tensor

        return (sum(s[0] for s in shapes), *shapes[0][1:]), dtype, load

    def dense_intermediate_size(self) -> int:
        return self._dense(self.layers[0], self._spec("down_proj"))[0][-1]

    def expert_intermediate_size(self) -> int:
        return self.dense_intermediate_size() // self.options.granularity

    def overflowing_layers(self) -> list[int]:
        """MoE layers whose scaled expert output projection exceeds the largest value of its dtype (e.g. float16
        with ``softmax_topk`` or slices: the scale is E x G_r / k or G_r). Reads each layer's down projection once."""
        options = self.options
        scale = max(options.expert_scale, 2.0 if options.shared_expert_gate else 1.0)
        spec = self._spec("down_proj")
        if scale <= 1:
            return []
        layers = []
        for layer in self.layers:
            _, dtype, load = self._dense(layer, spec)
            if dtype.is_floating_point and load().abs().max().float() * scale > torch.finfo(dtype).max:
                layers.append(layer)
        return layers

    def _spec(self, name: str) -> ExpertTensor:
        return next(t for t in self.adapter.expert_tensors(self.config) if t.name == name)

    def _routed_part(self, name: str, tensor: torch.Tensor, shard: int) -> torch.Tensor:
        """Slice ``shard`` of a dense [out, in] tensor as a routed expert, with the exactness scale applied."""
        options, width = self.options, self.expert_intermediate_size()
        part = slice_neurons(tensor, name, shard * width, width)
        if name == "down_proj":
            return part * options.expert_scale
        if name == "down_proj_bias":  # counted once per virtual group, or carried by the shared expert
            return part * (options.expert_scale / options.routed_slices) if not options.shared_experts else part * 0
        return part

    def _mixed(self, part: torch.Tensor, spec: ExpertTensor, layer: int, expert: int, source: ExpertSource) -> torch.Tensor:
        """mergekit-moe's per-expert transforms: ``residual_scale`` on the down projection, then ``noise_scale``."""
        if source.residual_scale != 1.0 and spec.name.startswith("down_proj"):
            part = part * source.residual_scale
        if source.noise_scale:
            generator = seeded_generator(self.options.seed, layer, expert, "mix-noise" + spec.name)
            part = part + torch.randn(part.shape, generator=generator).to(part.dtype) * source.noise_scale
        return part

    def _expert(self, layer: int, spec: ExpertTensor) -> PlannedTensor:
        """Fused tensor [E, out, in] of one layer: expert e holds slice S + e mod G_r, scaled, then diversified."""
        (out_dim, *rest), dtype, _ = self._dense(layer, spec)
        options, width = self.options, self.expert_intermediate_size()
        num_experts, routed, shared = options.num_experts, options.routed_slices, options.shared_experts
        if spec.name == "down_proj":
            shape = (num_experts, out_dim, width)
        elif spec.name == "down_proj_bias":
            shape = (num_experts, out_dim)
        else:  # gate/up rows (and their biases) are the sliced axis
            shape = (num_experts, out_dim // options.granularity, *rest)

        def chunks():
            drop, noise = options.drop_upcycling_ratio, options.expert_noise
            loaded, slices = None, []  # one source tensor (and its slices) at a time
            for expert in range(num_experts):
                source = self.experts[expert // routed]
                if loaded != source:
                    dense = self._dense(layer, spec, source.source)[2]()
                    slices = [self._routed_part(spec.name, dense, shared + g) for g in range(routed)]
                    loaded = source
                part = self._mixed(slices[expert % routed], spec, layer, expert, source).to(dtype)  # noise: per copy
                if drop == 0 and (noise == 0 or spec.is_bias):
                    yield part
                else:
                    yield diversify(part, spec.name, layer=layer, expert=expert, seed=options.seed, drop_ratio=drop,
                                    noise=noise).to(dtype)

        return PlannedTensor(f"{DENSE_PREFIX}{self.adapter.mlp_prefix(layer)}experts.{spec.name}", dtype, shape, chunks)

    def _shared_base(self, layer: int, specs: list[ExpertTensor]) -> list[PlannedTensor]:
        """Shared-weight experts (``expert_sharing="lora"``): the dense MLP once, as the experts module's
        ``<projection>`` [out, in] (the output projection scaled like routed experts), and per adapted projection
        ``deltas.<part>_lora_A`` [E, r, in] (nn.Linear's initialisation, seeded) and ``deltas.<part>_lora_B``
        [E, out, r] zero."""
        options, prefix = self.options, f"{DENSE_PREFIX}{self.adapter.mlp_prefix(layer)}experts."
        E, r = options.num_experts, options.expert_lora_rank
        planned, shapes = [], {}
        for spec in specs:
            shape, dtype, load = self._dense(layer, spec)
            planned.append(PlannedTensor(prefix + spec.name, dtype, shape,
                                         lambda spec=spec, load=load, dtype=dtype: [self._routed_part(spec.name, load(), 0)
                                                                                    .to(dtype)]))
            if not spec.is_bias:
                shapes["down" if spec.name == "down_proj" else "up"] = (shape, dtype)
        for part in options.lora_targets:
            (out_dim, in_dim), dtype = shapes[part]

            def lora_a(part=part, in_dim=in_dim, dtype=dtype):
                bound = 1 / in_dim**0.5  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT initialise A
                for expert in range(E):
                    generator = seeded_generator(options.seed, layer, expert, "lora_A" + part)
                    yield ((torch.rand((r, in_dim), generator=generator) * 2 - 1) * bound).to(dtype)

            planned.append(PlannedTensor(f"{prefix}deltas.{part}_lora_A", dtype, (E, r, in_dim), lora_a))
            planned.append(PlannedTensor(f"{prefix}deltas.{part}_lora_B", dtype, (E, out_dim, r),
                                         lambda shape=(E, out_dim, r), dtype=dtype: [torch.zeros(shape, dtype=dtype)]))
        return planned

    def shared_width(self) -> int:
        """Intermediate width of the shared expert (0: none): S slices, or a mixed model's whole MLP."""
        if self.shared is not None:
            return self.dense_intermediate_size()
        return self.options.shared_experts * self.expert_intermediate_size()

    def _shared(self, layer: int, spec: ExpertTensor) -> list[PlannedTensor]:
        """The shared expert's tensors built from ``spec`` (the first S slices, unscaled, doubled under a sigmoid
        gate that starts at 1/2); with ``shared_expert_gate`` the gate's zero weight follows the down projection."""
        options = self.options
        width = self.shared_width()
        factor = 2.0 if options.shared_expert_gate else 1.0  # sigmoid(0) = 1/2
        if self.shared is not None:  # a mixed model's shared expert: one checkpoint's whole MLP
            factor *= self.shared.residual_scale
        prefix = f"{DENSE_PREFIX}{self.adapter.mlp_prefix(layer)}shared_expert."
        (_, *rest), dtype, load = self._dense(layer, spec, self.shared.source if self.shared else 0)
        suffix = "bias" if spec.is_bias else "weight"
        stem = spec.name.removesuffix("_bias")

        def part() -> torch.Tensor:
            out = slice_neurons(load(), spec.name, 0, width)
            return (out * factor if stem == "down_proj" else out).to(dtype)

        if stem == "gate_up_proj":  # fused [gate; up] -> two Linear layers
            return [PlannedTensor(f"{prefix}{target}.{suffix}", dtype, (width, *rest),
                                  lambda half=half: [part().chunk(2, dim=0)[half]])
                    for half, target in enumerate(("gate_proj", "up_proj"))]
        hidden = self.config.get_text_config().hidden_size
        shape = (width, *rest) if stem == "up_proj" else ((hidden, width) if not spec.is_bias else (hidden,))
        planned = [PlannedTensor(f"{prefix}{stem}.{suffix}", dtype, shape, lambda: [part()])]
        if options.shared_expert_gate and spec.name == "down_proj":
            gate = (1, hidden)
            planned.append(PlannedTensor(f"{prefix[:-1]}_gate.weight", dtype, gate, lambda: [torch.zeros(gate, dtype=dtype)]))
        return planned

    def _router(self, layer: int, dtype: torch.dtype) -> list[PlannedTensor]:
        """Router weight [E, H]: one row per copy, repeated over the G_r slices of its virtual group."""
        options = self.options
        copies, hidden = options.num_experts // options.routed_slices, self.config.get_text_config().hidden_size

        def chunks():
            if options.router_init == "zero":
                rows = torch.zeros(copies, hidden)
            elif self.router_rows is not None:
                rows = self.router_rows[layer]
            elif options.router_init == "uniform":  # nn.Linear's default: U(-1/sqrt(H), 1/sqrt(H))
                generator = seeded_generator(options.seed, layer, 0, "router")
                rows = (torch.rand((copies, hidden), generator=generator) * 2 - 1) / hidden**0.5
            else:
                generator = seeded_generator(options.seed, layer, 0, "router")
                rows = torch.randn((copies, hidden), generator=generator) * options.router_init_std
            yield rows.repeat_interleave(options.routed_slices, dim=0).to(dtype)

        prefix = f"{DENSE_PREFIX}{self.adapter.mlp_prefix(layer)}gate."
        planned = [PlannedTensor(prefix + "weight", dtype, (options.num_experts, hidden), chunks)]
        if ROUTERS[options.router_type].balancing_bias:
            shape = (options.num_experts,)
            planned.append(PlannedTensor(prefix + "e_score_correction_bias", torch.float32, shape,
                                         lambda: [torch.zeros(shape, dtype=torch.float32)]))
        return planned

    # -- the plan --------------------------------------------------------------------------------
    def mlp_tensors(self, layer: int) -> set[str]:
        """Dense tensors of ``layer`` that the MoE block replaces (its MLP module and the bypassed modules)."""
        layer_prefix = f"{self.adapter.decoder_layers_path}.{layer}."
        prefixes = (self.adapter.mlp_prefix(layer), *(f"{layer_prefix}{path}." for path in self.adapter.bypass))
        return {n for n in self.layout.shapes if n.startswith(prefixes)}

    def build(self) -> list[PlannedTensor]:
        if self.options.router_init in ("hidden", "embedding") and self.router_rows is None:
            raise ValueError(f"router_init={self.options.router_init!r} needs router_rows computed from the prompts")
        plan: list[PlannedTensor] = []
        replaced = {name: layer for layer in self.layers for name in self.mlp_tensors(layer)}
        specs = self.adapter.expert_tensors(self.config)
        intermediate, granularity = self.dense_intermediate_size(), self.options.granularity
        if intermediate % granularity:
            raise InvalidOptionError(f"granularity={granularity} is invalid: the dense MLP's {intermediate} intermediate "
                                     f"neurons must split into equal slices; use a divisor of {intermediate}")
        done: set[int] = set()
        for layer in self.layers:
            wanted = {self.adapter.source_prefix(layer) + s for spec in specs for s in spec.sources}
            present = self.mlp_tensors(layer)
            if wanted != present:
                raise CheckpointError(
                    f"layer {layer}'s MLP holds {sorted(present)} but the {self.config.model_type} adapter expects "
                    f"{sorted(wanted)}; this checkpoint's MLP layout is not supported"
                )
        for name in self.layout.shapes:
            layer = replaced.get(name)
            if layer is not None:
                if layer not in done and self.options.expert_sharing == "lora":
                    base = self._shared_base(layer, specs)
                    plan.extend(self._router(layer, base[0].dtype))
                    plan.extend(base)
                    done.add(layer)
                elif layer not in done:
                    experts = [self._expert(layer, spec) for spec in specs]
                    plan.extend(self._router(layer, experts[0].dtype))
                    for spec, routed in zip(specs, experts, strict=True):
                        plan.append(routed)
                        if self.shared_width():
                            plan.extend(self._shared(layer, spec))
                    done.add(layer)
            elif name in self.keys:
                plan.append(self._copy(name))
        return plan


def check_against_model(plan: list[PlannedTensor], moe_config: UpcycledMoeConfig,
                        task: Task = "causal_lm") -> UpcycledMoePreTrainedModel:
    """Raise if the planned names/shapes differ from the MoE model's (built on the meta device); return that model."""
    with torch.device("meta"):
        model = MOE_CLASSES[task](moe_config)
    check_planned(plan, model, "the upcycled model (internal error)")
    return model
