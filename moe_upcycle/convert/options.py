"""Typed, validated options of the converter (the CLI flags of ``moe-upcycle convert``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from ..errors import InvalidOptionError

DtypeName = Literal["auto", "bfloat16", "float16", "float32"]
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
}
LAYER_SPEC_HELP = "all | every:N[:OFFSET] | first-half | second-half | comma-separated indices such as 0,3,5"


def _invalid(field: str, value: Any, allowed: str) -> InvalidOptionError:
    return InvalidOptionError(f"{field}={value!r} is invalid: expected {allowed}")


@dataclass
class UpcycleOptions:
    """What to build from the dense checkpoint.

    Args:
        num_experts: experts per MoE layer, E (each a copy of the dense MLP).
        top_k: experts selected per token, k (``1 <= k <= E``).
        layers: which decoder layers get a MoE block; see :func:`resolve_layers`.
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

    num_experts: int = 8
    top_k: int = 2
    layers: str | Sequence[int] = "all"
    router_init_std: float = 0.02
    expert_noise: float = 0.0
    drop_upcycling_ratio: float = 0.0
    dtype: DtypeName = "auto"
    max_shard_size: int | str = "5GB"
    seed: int = 0
    revision: str | None = None
    verify: bool = False
    overwrite: bool = False
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0

    def __post_init__(self):
        if not isinstance(self.num_experts, int) or self.num_experts < 2:
            raise _invalid("num_experts", self.num_experts, "an integer >= 2")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise _invalid("top_k", self.top_k, f"an integer in [1, num_experts={self.num_experts}]")
        if not self.router_init_std > 0:
            raise _invalid("router_init_std", self.router_init_std,
                           "a number > 0 (an all-zero router ties and routes every token to the same experts)")
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

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype]

    @property
    def is_exact(self) -> bool:
        """True when the recipe makes the MoE model compute exactly what the dense model did."""
        return self.expert_noise == 0 and self.drop_upcycling_ratio == 0

    def recipe(self) -> dict[str, Any]:
        """The options worth recording in the output config (for cards and reproduction)."""
        skip = {"verify", "overwrite", "max_shard_size"}
        out = {k: v for k, v in asdict(self).items() if k not in skip}
        out["layers"] = self.layers if isinstance(self.layers, str) else list(self.layers)
        return out


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000; ints pass through. Raises :class:`InvalidOptionError`."""
    if isinstance(size, int) and size > 0:
        return size
    match = _SIZE.match(str(size))
    if not match:
        raise _invalid("max_shard_size", size, "a byte count or a size such as 500MB, 5GB, 2GiB")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
    if value < 1:
        raise _invalid("max_shard_size", size, "a positive size")
    return int(value)


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
