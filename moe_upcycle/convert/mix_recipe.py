"""The ``moe-upcycle mix`` recipe: mergekit-moe's YAML keys as they are, plus ours, read strictly.

mergekit-moe (https://github.com/arcee-ai/mergekit, ``docs/moe.md``)::

    base_model: path/to/self_attn_donor      # attention, norms, embeddings (nonexpert: base)
    gate_mode: hidden                         # hidden | cheap_embed | random | uniform_random
    dtype: bfloat16
    experts_per_token: 2
    experts:
      - source_model: path/to/expert_1
        positive_prompts: ["..."]
        negative_prompts: ["..."]             # optional
        noise_scale: 0.01                     # optional: absolute Gaussian noise on the expert's weights
        residual_scale: 0.5                   # optional: factor on its down projection
    shared_experts: [{source_model: ...}]     # optional, at most one: an always-on expert
    architecture: mixtral                     # optional: write that native class (via ``moe-upcycle export``)

Ours on top: ``nonexpert: base | average`` (Branch-Train-MiX, arXiv 2403.07816: the float32 mean of the experts'
models; the default without ``base_model``), ``copies`` per expert, ``layers``, ``router_type``,
``router_aux_loss_coef``, ``seed``, ``allow_identical_sources``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidOptionError
from ..yaml_config import read_yaml
from .router_data import ExpertPrompts

GATE_MODES = {"hidden": "hidden", "cheap_embed": "embedding", "random": "random", "uniform_random": "uniform"}
ARCHITECTURES = {"mixtral": "mixtral", "qwen": "qwen2_moe", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe",
                 "flex_olmo": "flex_olmo", "granitemoe": "granitemoe"}  # mergekit's name or ours -> export target
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale", "copies"}


@dataclass(frozen=True)
class MixExpert:
    source_model: str
    prompts: ExpertPrompts
    noise_scale: float = 0.0
    residual_scale: float = 1.0
    copies: int = 1


@dataclass(frozen=True)
class MixRecipe:
    experts: tuple[MixExpert, ...]
    base_model: str | None = None
    gate_mode: str = "hidden"
    dtype: str = "auto"
    experts_per_token: int = 2
    shared_experts: tuple[MixExpert, ...] = ()
    architecture: str | None = None
    nonexpert: str = "base"
    layers: str | list[int] = "all"
    router_type: str = "topk_renorm"
    router_aux_loss_coef: float | None = None
    seed: int = 0
    allow_identical_sources: bool = False
    path: Path | None = field(default=None, compare=False)

    @property
    def num_experts(self) -> int:
        return sum(e.copies for e in self.experts)

    @property
    def has_prompts(self) -> bool:
        return any(e.prompts.positive or e.prompts.negative for e in (*self.experts, *self.shared_experts))

    def sources(self) -> list[str]:
        """Every model the recipe reads, base first, each once."""
        names = [self.base_model] if self.base_model else []
        return list(dict.fromkeys([*names, *(e.source_model for e in (*self.experts, *self.shared_experts))]))


def _fail(where: str, message: str) -> InvalidOptionError:
    return InvalidOptionError(f"{where}: {message}")


def _typed(where: str, key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise _fail(where, f"{key} must be {what}, got {value!r:.80}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(where, f"{key} must be {what}, got {value!r}")
    return value


def _prompts(where: str, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise _fail(where, f"{key} must be a list of non-empty strings, got {value!r:.80}")
    return tuple(value)


def _expert(where: str, entry: Any) -> MixExpert:
    if not isinstance(entry, dict):
        optional = ", ".join(sorted(EXPERT_KEYS - {"source_model"}))
        raise _fail(where, f"must be a mapping with source_model (and optionally {optional}), got {entry!r:.80}")
    unknown = sorted(map(str, set(entry) - EXPERT_KEYS))
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; allowed: {sorted(EXPERT_KEYS)}")
    source = _typed(where, "source_model", entry.get("source_model"), str, "a local folder or Hub model id")
    noise = entry.get("noise_scale")
    noise = 0.0 if noise is None else _typed(where, "noise_scale", noise, (int, float), "a number >= 0")
    residual = entry.get("residual_scale")
    residual = 1.0 if residual is None else _typed(where, "residual_scale", residual, (int, float), "a number")
    copies = _typed(where, "copies", entry.get("copies", 1), int, "an integer >= 1")
    if noise < 0 or copies < 1:
        raise _fail(where, f"noise_scale must be >= 0 and copies >= 1, got {noise} and {copies}")
    prompts = ExpertPrompts(_prompts(where, "positive_prompts", entry.get("positive_prompts")),
                            _prompts(where, "negative_prompts", entry.get("negative_prompts")))
    return MixExpert(source, prompts, float(noise), float(residual), copies)


def parse_mix_recipe(document: Any, path: Path | None = None) -> MixRecipe:
    """A :class:`MixRecipe` from a parsed YAML document; every problem is one InvalidOptionError naming the key."""
    name = str(path) if path else "the mix recipe"
    if not isinstance(document, dict):
        raise _fail(name, f"must be a mapping with an 'experts' list (mergekit-moe's format), got {type(document).__name__}")
    allowed = {f for f in MixRecipe.__dataclass_fields__ if f != "path"} | {"tokenizer_source"}
    unknown = sorted(map(str, set(document) - allowed))
    if unknown:
        raise _fail(name, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    if document.get("tokenizer_source", "base") != "base":
        raise _fail(name, f"tokenizer_source={document['tokenizer_source']!r} is not supported: the sources must share "
                          "one vocabulary, and the base model's tokenizer is used (tokenizer_source: base)")
    experts = document.get("experts")
    if not isinstance(experts, list) or not experts:
        raise _fail(name, f"experts must be a non-empty list of {{source_model: ...}} entries, got {experts!r:.80}")
    shared = document.get("shared_experts")
    shared = [] if shared is None else shared
    if not isinstance(shared, list) or len(shared) > 1:
        raise _fail(name, f"shared_experts must be a list of at most one entry, got {shared!r:.80}")
    base = document.get("base_model")
    if base is not None:
        _typed(name, "base_model", base, str, "a local folder or Hub model id")
    gate_mode = document.get("gate_mode", "hidden")
    if not isinstance(gate_mode, str) or gate_mode not in GATE_MODES:  # a list is unhashable
        raise _fail(name, f"gate_mode={gate_mode!r} is not one of {', '.join(GATE_MODES)}")
    architecture = document.get("architecture")
    if architecture is not None and (not isinstance(architecture, str) or architecture not in ARCHITECTURES):
        raise _fail(name, f"architecture={architecture!r} is not one of {', '.join(ARCHITECTURES)} (omit it to keep "
                          "the upcycled_moe class, which runs every recipe)")
    nonexpert = document.get("nonexpert", "base" if base else "average")
    if nonexpert not in ("base", "average"):
        raise _fail(name, f"nonexpert={nonexpert!r} is not one of base, average")
    if nonexpert == "base" and not base:
        raise _fail(name, "nonexpert: base needs a base_model (the donor of attention, norms and embeddings)")
    layers = document.get("layers", "all")
    if not (isinstance(layers, str) or isinstance(layers, list) and all(type(i) is int for i in layers)):
        raise _fail(name, f"layers must be a layer spec such as all or every:2, or a list of layer indices, got {layers!r:.80}")
    aux = document.get("router_aux_loss_coef")
    recipe = MixRecipe(
        experts=tuple(_expert(f"{name}: experts[{i}]", e) for i, e in enumerate(experts)),
        base_model=base, gate_mode=gate_mode,
        dtype=_typed(name, "dtype", document.get("dtype", "auto"), str, "a dtype name"),
        experts_per_token=_typed(name, "experts_per_token", document.get("experts_per_token", 2), int, "an integer >= 1"),
        shared_experts=tuple(_expert(f"{name}: shared_experts[{i}]", e) for i, e in enumerate(shared)),
        architecture=architecture, nonexpert=nonexpert, layers=layers,
        router_type=_typed(name, "router_type", document.get("router_type", "topk_renorm"), str, "a router type"),
        router_aux_loss_coef=None if aux is None else float(_typed(name, "router_aux_loss_coef", aux, (int, float), "a number")),
        seed=_typed(name, "seed", document.get("seed", 0), int, "an integer"),
        allow_identical_sources=_typed(name, "allow_identical_sources", document.get("allow_identical_sources", False),
                                       bool, "true or false"),
        path=path,
    )
    if recipe.shared_experts and recipe.shared_experts[0].copies != 1:
        raise _fail(name, "shared_experts[0].copies must be 1: the shared expert runs for every token")
    if recipe.has_prompts and GATE_MODES[gate_mode] not in ("hidden", "embedding"):
        prompted = {key: [i for i, e in enumerate(entries) if e.prompts.positive or e.prompts.negative]
                    for key, entries in (("experts", recipe.experts), ("shared_experts", recipe.shared_experts))}
        where = " and ".join(f"{key} {indices}" for key, indices in prompted.items() if indices)
        raise _fail(name, f"gate_mode={gate_mode!r} ignores prompts, but {where} have positive_prompts or "
                          "negative_prompts; use gate_mode: hidden or cheap_embed, or remove the prompts")
    if GATE_MODES[gate_mode] in ("hidden", "embedding"):
        missing = [i for i, e in enumerate(recipe.experts) if not e.prompts.positive]
        if missing:
            raise _fail(name, f"gate_mode={gate_mode!r} builds each router row from its expert's positive_prompts, and "
                              f"experts {missing} have none; add them, or use gate_mode: random")
    if recipe.num_experts < recipe.experts_per_token:
        raise _fail(name, f"experts_per_token={recipe.experts_per_token} exceeds the {recipe.num_experts} expert(s) "
                          "(copies counted); add experts or copies, or lower experts_per_token")
    return recipe


def load_mix_recipe(path: str | Path) -> MixRecipe:
    path = Path(path)
    return parse_mix_recipe(read_yaml(path, "mix recipe"), path)


__all__ = ["ARCHITECTURES", "GATE_MODES", "MixExpert", "MixRecipe", "load_mix_recipe", "parse_mix_recipe"]
