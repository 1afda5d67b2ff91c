"""Lazy, checked reads of (possibly sharded) safetensors checkpoints and their config.json.

Every shard header is validated when a checkpoint is opened, so a damaged download fails before anything
is written; tensor data is read on demand with plain reads (never a memory map of a whole shard).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .formats import MAX_HEADER, PICKLE_SUFFIXES, SAFE_INDEX, SAFE_SINGLE, SAFE_TO_DTYPE


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, read from a shard header without loading data."""

    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the shard file
    nbytes: int


def raw_config(folder: Path, what: str = "a Transformers checkpoint") -> dict:
    """``folder/config.json`` as a dict; a missing, unreadable or non-object file is a :class:`CheckpointError`."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; pass the folder of {what}")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object; pass the folder of {what}")
    return raw


def read_config(folder: Path, config_class=None, what: str = "a Transformers checkpoint"):
    """Load ``folder/config.json`` with ``config_class`` (default ``AutoConfig``); any failure is one
    :class:`CheckpointError` line (Transformers raises a zoo of exception types for malformed configs)."""
    from transformers import AutoConfig

    raw_config(folder, what)
    try:
        return (config_class or AutoConfig).from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 (ValueError, TypeError, KeyError, AttributeError, IndexError, StrictDataclassError...)
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {' '.join(str(err).split()) or type(err).__name__}") from None


def read_header(path: Path) -> dict:
    """Parse and check a safetensors header; raise :class:`CheckpointError` naming the file if it is corrupt."""
    fix = "the file is damaged or incomplete: download or copy it again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(size - 8, MAX_HEADER):
                raise ValueError(f"header length {length} exceeds the file size {size}")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
        data_size = size - 8 - length
        metadata = header.get("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError(f"its __metadata__ is {metadata!r}, not a mapping of strings")
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            shape = entry["shape"]
            if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
                    and type(begin) is int and type(end) is int):
                raise ValueError(f"tensor {name!r} has shape {shape!r} / offsets {begin!r}..{end!r}")
            if entry["dtype"] not in SAFE_TO_DTYPE or not 0 <= begin <= end <= data_size:
                raise ValueError(f"tensor {name!r} has dtype {entry['dtype']!r} / offsets {begin}..{end} "
                                 f"outside the {data_size}-byte data section")
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a safetensors file; pass a checkpoint folder whose weights are "
                              "*.safetensors files") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    except (ValueError, KeyError, TypeError, struct.error) as err:
        raise CheckpointError(f"{path} is not a valid safetensors file ({err}); {fix}") from None
    header["__header_length__"] = length
    return header


class SafetensorsCheckpoint:
    """A lazily read, possibly sharded, safetensors checkpoint folder.

    Every shard's header is checked when the checkpoint is opened, so a missing or corrupt shard fails
    before anything is written; tensor data is read on demand, one shard kept open at a time.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.info: dict[str, TensorInfo] = {}
        for shard in self._shards():
            header = read_header(self.folder / shard)
            data_start = 8 + header.pop("__header_length__")
            for name, entry in header.items():
                if name != "__metadata__":
                    begin, end = entry["data_offsets"]
                    info = TensorInfo(shard, SAFE_TO_DTYPE[entry["dtype"]], tuple(entry["shape"]), data_start + begin, end - begin)
                    if math.prod(info.shape) * info.dtype.itemsize != info.nbytes:
                        raise CheckpointError(f"{self.folder / shard}: tensor {name!r} has {info.nbytes} bytes for shape "
                                              f"{list(info.shape)}; the file is damaged: download or copy it again")
                    self.info[name] = info
        self._open_name: str | None = None
        self._open_file = None

    def _shards(self) -> list[str]:
        index = self.folder / SAFE_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise ValueError(f"its weight_map is a {type(weight_map).__name__}, not a mapping of names to files")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{index} is not a valid index ({err}); download or copy it again") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.folder / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"shard(s) {', '.join(missing)} named in {index} are missing from {self.folder}; "
                    "download the complete checkpoint again"
                )
            return shards
        if (self.folder / SAFE_SINGLE).exists():
            return [SAFE_SINGLE]
        found = sorted(p.name for p in self.folder.glob("*.safetensors") if p.is_file())
        if found:
            return found
        pickled = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"{self.folder} has only pickled weights ({', '.join(pickled)}); moe-upcycle never unpickles files. "
                "Convert the checkpoint to safetensors on a machine you trust "
                "(load it and call save_pretrained), then upcycle that folder"
            )
        raise CheckpointError(f"{self.folder} has no *.safetensors weights")

    def keys(self) -> list[str]:
        return list(self.info)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory.

        Plain reads at the header's offsets rather than a memory map: mapped pages of the whole shard would
        stay resident while it is open, and peak memory would grow with the shard size.
        """
        info = self.info[name]
        if self._open_name != info.shard:
            if self._open_file is not None:
                self._open_file.close()
            self._open_file = open(self.folder / info.shard, "rb")
            self._open_name = info.shard
        buffer = bytearray(info.nbytes)
        self._open_file.seek(info.offset)
        if self._open_file.readinto(buffer) != info.nbytes:
            raise CheckpointError(f"{self.folder / info.shard} ended inside tensor {name!r}; download or copy it again")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)

    def iter_rows(self, name: str) -> Iterator[torch.Tensor]:
        """Tensor ``name`` one leading-dimension slice at a time (an expert tensor [E, ...] one expert at a time),
        so that copying it never holds more than one slice; tensors of fewer than 3 dimensions come whole."""
        info = self.info[name]
        if len(info.shape) < 3 or info.nbytes == 0:
            yield self.get(name)
            return
        step = info.nbytes // info.shape[0]
        with open(self.folder / info.shard, "rb") as f:
            f.seek(info.offset)
            for _ in range(info.shape[0]):
                buffer = bytearray(step)
                if f.readinto(buffer) != step:
                    raise CheckpointError(f"{self.folder / info.shard} ended inside tensor {name!r}; download or copy it again")
                yield torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape[1:])

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._open_file is not None:
            self._open_file.close()
            self._open_file, self._open_name = None, None
