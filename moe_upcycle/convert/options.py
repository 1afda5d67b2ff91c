"""Typed, validated options of the converter (the CLI flags of ``moe-upcycle convert``)."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import MISSING, asdict, dataclass, field, fields
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch

from ..checkpoint import parse_size
from ..errors import InvalidOptionError
from ..modeling.configuration_upcycled_moe import ExpertSharing, RouterType
from ..modeling.routers import ROUTER_TYPES, ROUTERS
from .router_data import DEFAULT_LOGIT_STD
from .routers import ROUTER_RECIPES

DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
}
DtypeName = Literal[tuple(DTYPES)]
ROUTER_INITS: tuple[str, ...] = ("auto", "random", "uniform", "zero", "hidden", "embedding")
RouterInit = Literal[ROUTER_INITS]
LORA_TARGET_NAMES = {"gate_up": "up", "up": "up", "down": "down"}  # flag spelling -> runtime name
LAYER_SPEC_HELP = "all | every:N[:OFFSET] | first-half | second-half | comma-separated indices such as 0,3,5"


def option(default: Any, help: str, *, flag: str | None = None, metavar: str | None = None, reproduce: bool = True):
    """A dataclass field declaring one convert option: ``flag`` defaults to ``--`` + the name with dashes;
    ``reproduce``: the option changes what is written, so the card's reproduce command carries it."""
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar, "reproduce": reproduce})


def _invalid(field: str, value: Any, allowed: str) -> InvalidOptionError:
    return InvalidOptionError(f"{field}={value!r} is invalid: expected {allowed}")


def _matches(value: Any, annotation: Any) -> bool:
    """``isinstance`` for the annotations options use, without Python's ``True == 1``: a bool is not a number and a
    string is not a bool (``verify="no"`` is an error, not true)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin in (Sequence, list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(item, args[0]) for item in value)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (Sequence, list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "None"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def check_field_types(options: Any) -> None:
    """Raise :class:`InvalidOptionError` naming the first dataclass field whose value does not match its annotation."""
    hints = get_type_hints(type(options))
    for item in fields(options):
        value = getattr(options, item.name)
        if not _matches(value, hints[item.name]):
            raise _invalid(item.name, value, _describe(hints[item.name]))


@dataclass
class UpcycleOptions:
    """What to build from the dense checkpoint.

    Args:
        num_experts: routed experts per MoE layer, E. With ``granularity`` G and ``shared_experts`` S the dense
            MLP's intermediate neurons are cut into G slices, S of them form the shared expert and the other
            G_r = G - S are copied ``E / G_r`` times ("virtual groups" of G_r experts, He et al. 2024).
        top_k: experts selected per token, k (``1 <= k <= E``); a multiple of G_r, so that every token picks
            whole virtual groups.
        granularity: G, slices per dense MLP (fine-grained upcycling, He et al. 2024, arXiv 2410.07524).
        shared_experts: S, slices of width I/G that become one always-on shared expert (DeepSeekMoE / Qwen-MoE).
        shared_expert_gate: scale the shared expert by ``sigmoid(x @ w)`` (Qwen2-MoE); w starts at 0 and the
            shared expert's output projection is doubled, so the model stays exact.
        router_type: a router kind of ``modeling/routers.py`` (``topk_renorm`` Mixtral, ``softmax_topk``,
            ``sigmoid`` DeepSeek-V3); its row in ``convert/routers.py`` says how experts are scaled to stay exact.
        router_init: ``random`` (normal, ``router_init_std``; rows shared within a virtual group), ``uniform``
            (``nn.Linear``'s default, U(-1/sqrt(H), 1/sqrt(H)); mergekit's ``uniform_random``), ``zero``,
            ``hidden`` / ``embedding`` (rows from per-expert prompts, see ``router_prompts``), or ``auto``:
            the router kind's exact initialisation where it has one (``zero`` for ``softmax_topk`` without slicing),
            else ``random``.
        router_prompts: YAML file of per-expert prompts for ``router_init`` ``hidden`` / ``embedding``.
        router_bias_update_rate: balancing speed gamma of routers with a bias (``sigmoid``: DeepSeek-V3's 0.001);
            0 elsewhere.
        layers: which decoder layers get a MoE block; see :func:`resolve_layers`.
        router_logit_std: the logit spread across experts that prompt-initialised router rows are scaled to.
        router_init_std: std of the random router. Must be > 0: an all-zero router ties and sends every
            token to the same k experts.
        expert_noise: relative Gaussian noise added to each expert's weights (std = ``expert_noise`` x the
            weight's own std). 0 keeps the model exact.
        drop_upcycling_ratio: Drop-Upcycling (Nakamura et al. 2025): fraction of each expert's intermediate
            neurons re-initialised from the original weights' statistics. 0 keeps the model exact.
        dtype: dtype of the written weights; ``auto`` keeps each source tensor's dtype.
        max_shard_size: largest output shard, bytes or a string such as ``"5GB"``/``"500MB"``.
        seed: seed of router and noise initialisation.
        revision: Hub revision (branch, tag or commit) of a Hub source.
        verify: compare dense and MoE logits after converting.
        overwrite: replace an existing non-empty output folder.
        router_aux_loss_coef / router_z_loss_coef / router_jitter_noise: training settings stored in the config.
    """

    # Each option is declared once: its flag, help and metavar here; type, default and choices from the annotation.
    # The `moe-upcycle convert` parser, the YAML recipe keys and the card's reproduce command are derived from this.
    num_experts: int = option(8, "experts per MoE layer (routed slices with --granularity)")
    top_k: int = option(2, "experts per token")
    layers: str | Sequence[int] = option("all", f"MoE layers: {LAYER_SPEC_HELP}")
    granularity: int = option(1, "fine-grained upcycling: cut each MLP into G neuron slices (He et al. 2024); "
                                 "--num-experts and --top-k count slices, e.g. --granularity 4 --num-experts 32 --top-k 8",
                              metavar="G")
    shared_experts: int = option(0, "slices (of G) that form an always-on shared expert (DeepSeekMoE / Qwen-MoE)",
                                 metavar="S")
    shared_expert_gate: bool = option(False, "sigmoid-gate the shared expert (Qwen2-MoE)")
    router_type: RouterType = option("topk_renorm", ", ".join(f"{kind} ({cls.label})" for kind, cls in ROUTERS.items()))
    router_init: RouterInit = option("auto", "router initialisation; hidden/embedding read --router-prompts (auto: zero "
                                             "for softmax_topk without slices, else random)")
    router_prompts: str | None = option(None, "per-expert prompts for --router-init hidden|embedding (see "
                                              "configs/router_prompts_example.yaml)", metavar="YAML")
    router_bias_update_rate: float | None = option(None, "routers with a balancing bias: its speed gamma (default "
                                                         + ", ".join(f"{kind} {cls.default_bias_update_rate}" for kind, cls
                                                                     in ROUTERS.items() if cls.balancing_bias)
                                                         + "; 0 elsewhere)")
    router_init_std: float = option(0.02, "std of the random router")
    router_logit_std: float = option(DEFAULT_LOGIT_STD, "--router-init hidden|embedding: spread of the router logits "
                                                        "across experts that prompt rows are scaled to")
    expert_sharing: ExpertSharing = option("none", "none: every expert owns a copy of the MLP; lora: the experts share "
                                                   "the frozen MLP, each adds a low-rank delta (MixLoRA)")
    expert_lora_rank: int = option(8, "--expert-sharing lora: rank r of each expert's delta", metavar="R")
    expert_lora_alpha: float | None = option(None, "--expert-sharing lora: alpha of the deltas, scale alpha/r "
                                                   "(default 2r, as MixLoRA)", metavar="A")
    expert_lora_targets: str = option("up,down", "--expert-sharing lora: projections with a delta: up (the fused gate "
                                                 "and up projection; also spelled gate_up) and/or down")
    expert_noise: float = option(0.0, "relative Gaussian noise per expert; > 0 breaks exactness on purpose")
    drop_upcycling_ratio: float = option(0.0, "Drop-Upcycling: re-initialise this fraction of each expert's neurons "
                                              "(paper: 0.5)", flag="--drop-upcycling", metavar="R")
    dtype: DtypeName = option("auto", "dtype of the written weights (auto: the source's)")
    max_shard_size: int | str = option("5GB", "largest output shard", reproduce=False)
    seed: int = option(0, "seed of router and noise initialisation")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of a Hub source")
    verify: bool = option(False, "compare dense and MoE logits after converting", reproduce=False)
    overwrite: bool = option(False, "replace an existing OUTPUT that moe-upcycle wrote", reproduce=False)
    router_aux_loss_coef: float | None = option(None, "load-balancing loss weight (default by router type: "
                                                      + ", ".join(f"{k} {c.aux_loss_coef}" for k, c in ROUTERS.items())
                                                      + ")")
    router_z_loss_coef: float | None = option(None, "router z-loss weight (default by router type: "
                                                    + ", ".join(f"{k} {c.z_loss_coef}" for k, c in ROUTERS.items())
                                                    + ")")
    router_jitter_noise: float = option(0.0, "router input jitter in training")

    def __post_init__(self):
        check_field_types(self)
        if not isinstance(self.num_experts, int) or self.num_experts < 2:
            raise _invalid("num_experts", self.num_experts, "an integer >= 2")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise _invalid("top_k", self.top_k, f"an integer in [1, num_experts={self.num_experts}]")
        if not self.router_logit_std > 0:
            raise _invalid("router_logit_std", self.router_logit_std, "a number > 0")
        if not self.router_init_std > 0:
            raise _invalid("router_init_std", self.router_init_std,
                           "a number > 0 (an all-zero router ties and routes every token to the same experts)")
        self._check_recipe()
        if not self.expert_noise >= 0:
            raise _invalid("expert_noise", self.expert_noise, "a number >= 0")
        if not 0 <= self.drop_upcycling_ratio < 1:
            raise _invalid("drop_upcycling_ratio", self.drop_upcycling_ratio,
                           "a fraction in [0, 1) of intermediate neurons to re-initialise (the paper uses 0.5)")
        if self.dtype not in DTYPES:
            raise _invalid("dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        self.max_shard_bytes = parse_size(self.max_shard_size)
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise _invalid(name, getattr(self, name), "a number >= 0")
        if not 0 <= self.router_jitter_noise < 1:
            raise _invalid("router_jitter_noise", self.router_jitter_noise, "a number in [0, 1)")
        if isinstance(self.layers, str):
            resolve_layers(self.layers, None)  # syntax check now; the range check needs the model

    def _check_recipe(self) -> None:
        """Validate granularity, shared experts and router choices against each other."""
        G, S = self.granularity, self.shared_experts
        if not isinstance(G, int) or G < 1:
            raise _invalid("granularity", G, "an integer >= 1 (slices per dense MLP)")
        if not isinstance(S, int) or S < 0:
            raise _invalid("shared_experts", S, "an integer >= 0")
        if S and S >= G:
            raise _invalid("shared_experts", S, f"fewer than granularity={G}: the shared expert is carved out of the "
                           "dense MLP's neurons, e.g. --granularity 4 --shared-experts 1")
        if self.shared_expert_gate and not S:
            raise _invalid("shared_expert_gate", True, "False without shared experts (set --shared-experts)")
        routed = self.routed_slices
        if self.num_experts % routed:
            raise _invalid("num_experts", self.num_experts,
                           f"a multiple of the {routed} routed slices per MLP (E = slices x copies)")
        if self.top_k % routed:
            raise _invalid("top_k", self.top_k, f"a multiple of the {routed} routed slices per MLP, so that every token "
                           "selects whole virtual groups (He et al. 2024: top-(G x k))")
        self._check_sharing()
        if self.router_type not in ROUTER_TYPES:
            raise _invalid("router_type", self.router_type, f"one of {', '.join(ROUTER_TYPES)}")
        if self.router_init not in ROUTER_INITS:
            raise _invalid("router_init", self.router_init, f"one of {', '.join(ROUTER_INITS)}")
        router = ROUTERS[self.router_type]
        if self.router_init == "auto":
            self.router_init = ROUTER_RECIPES[self.router_type].default_init(routed)
        if self.router_init == "zero" and routed > 1:
            raise _invalid("router_init", "zero", "random, hidden or embedding when experts are slices: tied router "
                           "logits would select incomplete virtual groups")
        if (self.router_prompts is None) == (self.router_init in ("hidden", "embedding")):
            raise _invalid("router_prompts", self.router_prompts,
                           "a YAML file of per-expert prompts exactly when router_init is hidden or embedding")
        if self.router_aux_loss_coef is None:
            self.router_aux_loss_coef = router.aux_loss_coef
        if self.router_z_loss_coef is None:
            self.router_z_loss_coef = router.z_loss_coef
        if self.router_bias_update_rate is None:
            self.router_bias_update_rate = router.default_bias_update_rate
        if not self.router_bias_update_rate >= 0 or (self.router_bias_update_rate and not router.balancing_bias):
            raise _invalid("router_bias_update_rate", self.router_bias_update_rate,
                           "a number >= 0, and 0 unless router_type is "
                           + " or ".join(kind for kind, cls in ROUTERS.items() if cls.balancing_bias))

    def _check_sharing(self) -> None:
        if self.expert_sharing == "none":
            return
        if self.granularity != 1 or self.shared_experts or self.drop_upcycling_ratio or self.expert_noise:
            raise _invalid("expert_sharing", self.expert_sharing, "none with --granularity, --shared-experts, "
                           "--drop-upcycling or --expert-noise (shared-weight experts are whole MLPs that differ by "
                           "their deltas only)")
        if self.expert_lora_rank < 1:
            raise _invalid("expert_lora_rank", self.expert_lora_rank, "an integer >= 1")
        if self.expert_lora_alpha is None:
            self.expert_lora_alpha = 2.0 * self.expert_lora_rank
        if not self.expert_lora_alpha > 0:
            raise _invalid("expert_lora_alpha", self.expert_lora_alpha, "a number > 0")
        names = [n.strip() for n in self.expert_lora_targets.split(",") if n.strip()]
        canonical = [LORA_TARGET_NAMES.get(n) for n in names]
        if not names or None in canonical or len(set(canonical)) != len(canonical):
            raise _invalid("expert_lora_targets", self.expert_lora_targets,
                           "distinct comma-separated names from gate_up (or up) and down")
        self.expert_lora_targets = ",".join(canonical)

    @property
    def lora_targets(self) -> list[str]:
        """The adapted projections as the runtime config names them (``up``, ``down``)."""
        return self.expert_lora_targets.split(",") if self.expert_sharing == "lora" else []

    @property
    def routed_slices(self) -> int:
        """G_r: neuron slices per dense MLP that become routed experts (one virtual group)."""
        return self.granularity - self.shared_experts

    @property
    def expert_scale(self) -> float:
        """Factor on the routed experts' output projections that keeps the block exact (see the router kind's row)."""
        return ROUTER_RECIPES[self.router_type].expert_scale(self.num_experts, self.top_k, self.routed_slices)

    def inexact_reasons(self) -> list[str]:
        """Why this recipe does not reproduce the dense model exactly (empty when it does)."""
        reasons = []
        if self.expert_noise:
            reasons.append(f"expert_noise={self.expert_noise}")
        if self.drop_upcycling_ratio:
            reasons.append(f"drop_upcycling_ratio={self.drop_upcycling_ratio}")
        router = ROUTER_RECIPES[self.router_type].inexact_reason(self.router_init)
        if router:
            reasons.append(router)
        return reasons

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype]

    @property
    def is_exact(self) -> bool:
        """True when the recipe makes the MoE model compute exactly what the dense model did."""
        return not self.inexact_reasons()

    def recipe(self) -> dict[str, Any]:
        """The options worth recording in the output config (for cards and reproduction)."""
        skip = {"verify", "overwrite", "max_shard_size"}
        out = {k: v for k, v in asdict(self).items() if k not in skip}
        out["layers"] = self.layers if isinstance(self.layers, str) else list(self.layers)
        return out


def resolve_layers(spec: str | Sequence[int], num_layers: int | None) -> list[int]:
    """Turn a layer selection into sorted layer indices.

    ``all``; ``every:N[:OFFSET]`` (layers ``OFFSET, OFFSET+N, ...``; OFFSET defaults to N-1, so
    ``every:2`` is layers 1, 3, 5, ... as in GShard and Switch Transformer); ``first-half``;
    ``second-half``; or explicit indices (``"0,3,5"`` or a sequence of ints).
    With ``num_layers=None`` only the syntax is checked.
    """
    n = num_layers if num_layers is not None else 1 << 30
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(n)) if num_layers is not None else []
        if text in ("first-half", "second-half"):
            if num_layers is None:
                return []
            half = num_layers // 2
            return list(range(half)) if text == "first-half" else list(range(half, num_layers))
        match = re.fullmatch(r"every:(\d+)(?::(\d+))?", text)
        if match:
            step = int(match.group(1))
            offset = int(match.group(2)) if match.group(2) is not None else step - 1
            if step < 1 or offset >= step:
                raise _invalid("layers", spec, "every:N[:OFFSET] with N >= 1 and 0 <= OFFSET < N")
            return list(range(offset, n, step)) if num_layers is not None else []
        if not re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
            raise _invalid("layers", spec, LAYER_SPEC_HELP)
        indices = [int(part) for part in text.split(",")]
    else:
        indices = list(spec)
    if len(set(indices)) != len(indices):
        raise _invalid("layers", spec, "distinct layer indices")
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise _invalid("layers", spec, f"layer indices in [0, {n - 1}] (the model has {num_layers} layers)")
    if num_layers is not None and not indices:
        raise _invalid("layers", spec, "at least one layer")
    return sorted(indices)


# -- everything derived from the field declarations -------------------------------------------------------------

def _flag(item) -> str:
    return item.metadata.get("flag") or "--" + item.name.replace("_", "-")


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """One command-line flag per :class:`UpcycleOptions` field: type, default and choices from its annotation."""
    hints = get_type_hints(UpcycleOptions)
    for item in fields(UpcycleOptions):
        if item.default is MISSING:
            continue
        annotation, default = hints[item.name], item.default
        help_text = item.metadata["help"] + ("" if default in (None, False) else f" (default {default})")
        kwargs: dict[str, Any] = dict(dest=item.name, default=default, help=help_text, metavar=item.metadata["metavar"])
        if annotation is bool:
            kwargs.pop("metavar")
            parser.add_argument(_flag(item), action="store_true", **kwargs)
            continue
        choices = get_args(annotation) if get_origin(annotation) is Literal else None
        members = {a for a in (get_args(annotation) or (annotation,)) if a is not type(None)}  # T or T | None
        kwargs["type"] = members.pop() if len(members) == 1 and choices is None and annotation is not str else str
        if choices:
            kwargs.update(choices=choices, metavar=None)
        parser.add_argument(_flag(item), **kwargs)


def options_from_namespace(args: argparse.Namespace) -> UpcycleOptions:
    return UpcycleOptions(**{item.name: getattr(args, item.name) for item in fields(UpcycleOptions)})


def reproduce_flags(recipe: dict[str, Any]) -> list[str]:
    """The flags that rebuild a conversion from its recorded ``recipe`` (``config.json``'s ``upcycling``): every
    option that changes what is written and differs from what the defaults would pick for this recipe."""
    items = [item for item in fields(UpcycleOptions) if item.metadata["reproduce"] and item.name in recipe]
    values = {item.name: recipe[item.name] for item in items}
    flags: list[str] = []
    for item in items:
        value = values[item.name]
        if value == item.default or value is None:
            continue
        if item.default in (None, "auto"):  # resolved from the others: leave it out when the default resolves to it
            with suppress(InvalidOptionError):
                if getattr(UpcycleOptions(**{**values, item.name: item.default}), item.name) == value:
                    continue
        if value is True:
            flags.append(_flag(item))
        else:
            flags += [_flag(item), ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return flags
