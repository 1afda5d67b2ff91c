"""``export --dequantize``: read a quantised upcycled checkpoint as if its experts were float tensors again.

A quantised MoE layer stores each projection P's experts split by precision (``P_int8`` + ``P_int8_scale``,
``P_int4`` + ``P_int4_scale``, ``P`` for experts kept in float; see ``modeling/quantized_experts.py``).
:class:`DequantizedCheckpoint` presents one [E, out, in] tensor ``P`` per projection instead, streamed one expert
at a time in expert order, with the dequantised values in the checkpoint's float dtype; every other tensor is the
checkpoint's own. It has the reading interface the exporter uses (``keys``, ``info``, ``iter_rows``, ``close``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace

import torch

from ..checkpoint import SafetensorsCheckpoint
from ..checkpoint.reader import TensorInfo
from ..modeling.configuration_upcycled_moe import UpcycledMoeConfig
from ..modeling.quantized_experts import FLOAT, QUANT_SCHEMES, scale_name, stored_name

_STORED = re.compile(rf"^(?P<base>.*\.experts\.(?:gate_up_proj|up_proj|down_proj))_(?P<scheme>{'|'.join(QUANT_SCHEMES)})"
                     r"(?P<scale>_scale)?$")
_FLOAT = re.compile(r"^.*\.experts\.(?:gate_up_proj|up_proj|down_proj)$")
_LAYER = re.compile(r"\.(\d+)\.[^.]+\.experts\.")


class DequantizedCheckpoint:
    """The float view of a quantised checkpoint (see the module doc); ``dtype``: the experts' float dtype."""

    def __init__(self, reader: SafetensorsCheckpoint, config: UpcycledMoeConfig, dtype: torch.dtype):
        self.reader, self.dtype, self.group_size = reader, dtype, config.expert_group_size
        self.precision = config.expert_precision
        self.info: dict[str, TensorInfo] = {}
        for key in reader.keys():
            stored = _STORED.match(key)
            base = stored["base"] if stored else key
            if base in self.info or (stored and stored["scale"]):
                continue
            if stored or (_FLOAT.match(key) and self._layer(key) in self.precision):
                shape = self._float_shape(base, stored, reader.info[key])
                self.info[base] = replace(reader.info[key], dtype=dtype, shape=shape,
                                          nbytes=dtype.itemsize * shape[0] * shape[1] * shape[2])
            else:
                self.info[key] = reader.info[key]

    @staticmethod
    def _layer(key: str) -> str | None:
        match = _LAYER.search(key)
        return match[1] if match else None

    def _float_shape(self, base: str, stored: re.Match | None, info: TensorInfo) -> tuple[int, int, int]:
        """[E, out, in] of projection ``base`` from one of its stored tensors."""
        num_experts = len(self.precision[self._layer(base)])
        if not stored:
            return (num_experts, *info.shape[1:])
        scale = self.reader.info[scale_name(base, stored["scheme"])].shape  # [n, out, in / group] or [n, out, 1]
        out, in_features = QUANT_SCHEMES[stored["scheme"]].logical_shape(info.shape[1:], scale[1:], self.group_size)
        return num_experts, out, in_features

    def keys(self) -> list[str]:
        return list(self.info)

    def get(self, name: str) -> torch.Tensor:
        if name in self.reader.info:
            return self.reader.get(name)
        return torch.stack(list(self.iter_rows(name)))

    def iter_rows(self, name: str) -> Iterator[torch.Tensor]:
        """Tensor ``name``; a dequantised projection one expert [out, in] at a time, in expert order."""
        if name in self.reader.info and (name not in self.info or self._layer(name) not in self.precision):
            yield from self.reader.iter_rows(name)
            return
        schemes = self.precision[self._layer(name)]
        rows = self.reader.iter_rows
        stored = {s: zip(rows(stored_name(name, s)), rows(scale_name(name, s)), strict=True) for s in set(schemes) - {FLOAT}}
        kept = rows(name) if FLOAT in schemes else iter(())
        for scheme in schemes:  # each stored tensor is read once, one expert at a time
            if scheme == FLOAT:
                yield next(kept).to(self.dtype)
            else:
                q, scale = next(stored[scheme])
                yield QUANT_SCHEMES[scheme].dequantize(q, scale, self.group_size, self.dtype)

    def close(self) -> None:
        self.reader.close()


__all__ = ["DequantizedCheckpoint"]
