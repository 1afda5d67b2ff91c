"""Streaming sharded safetensors writer that never holds a whole shard.

The writer is given the full plan (name, dtype, shape of every tensor) up front, writes each shard's
header first and then streams tensor bytes in chunks (for experts: one expert at a time), so peak memory
is one source tensor plus one expert slice, whatever the model or shard size.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, InvalidOptionError
from .formats import DTYPE_TO_SAFE, SAFE_INDEX, SAFE_SINGLE


@dataclass
class PlannedTensor:
    """One output tensor: its name, dtype, shape and a function producing its data in chunks.

    ``chunks()`` yields contiguous tensors of ``dtype`` whose concatenation (in row-major order) is the
    whole tensor; their total size must equal ``numel * itemsize``.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str, name: str = "max_shard_size") -> int:
    """``"5GB"`` -> 5_000_000_000; positive ints pass through. Raises :class:`InvalidOptionError` naming ``name``."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = _SIZE.match(str(size))
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()] if match else 0
    if value < 1:
        raise InvalidOptionError(f"{name}={size!r} is invalid: expected a positive byte count or a size such as "
                                 "500MB, 5GB, 2GiB")
    return int(value)


def check_planned(plan: list[PlannedTensor], model: torch.nn.Module, what: str, error=CheckpointError,
                  tied: Iterable[str] | None = None) -> None:
    """Raise ``error`` unless ``plan`` holds exactly ``model``'s tensors (names and shapes). ``tied``: names that
    may be left out (default: the model's tied weights). ``model`` is best built on the meta device; ``what``
    names it in the message."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or ()) if tied is None else set(tied)
    planned = {t.name: tuple(t.shape) for t in plan}
    if len(planned) != len(plan):
        raise error(f"two planned tensors share one name in {what}")
    missing = sorted(n for n in expected if n not in planned and n not in tied)
    extra = sorted(n for n in planned if n not in expected)
    if missing or extra:
        raise error(f"the tensors do not match {what}: {len(missing)} missing {missing[:3]}, {len(extra)} unexpected "
                    f"{extra[:3]}; is the checkpoint complete and its config.json the one it was saved with?")
    wrong = [f"{n} {list(s)} (expected {list(expected[n])})" for n, s in planned.items() if s != expected[n]]
    if wrong:
        raise error(f"{len(wrong)} tensor(s) have the wrong shape for {what}: {'; '.join(wrong[:3])}")


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy split, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _header_bytes(tensors: list[PlannedTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_TO_SAFE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f, tensor: PlannedTensor, progress: Callable[[int], None]) -> None:
    written = 0
    for chunk in tensor.chunks():
        if chunk.dtype != tensor.dtype:
            raise CheckpointError(f"internal error: {tensor.name} chunk has dtype {chunk.dtype}, planned {tensor.dtype}")
        data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
        f.write(memoryview(data))
        written += data.nbytes
        progress(data.nbytes)
    if written != tensor.nbytes:
        raise CheckpointError(f"internal error: wrote {written} bytes for {tensor.name}, planned {tensor.nbytes}")


def write_sharded(
    folder: Path, tensors: list[PlannedTensor], max_shard_bytes: int, progress: Callable[[int], None] = lambda n: None
) -> list[str]:
    """Write ``tensors`` as ``model.safetensors`` or ``model-XXXXX-of-YYYYY.safetensors`` plus the index.

    Returns the shard file names.
    """
    shards = plan_shards(tensors, max_shard_bytes)
    names = [SAFE_SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        with open(folder / name, "wb") as f:
            f.write(_header_bytes(shard))
            for tensor in shard:
                _write_tensor(f, tensor, progress)
                weight_map[tensor.name] = name
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names
