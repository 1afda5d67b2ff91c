"""Checkpoint I/O shared by every command: checked lazy safetensors reads, the streaming sharded writer,
and atomic output folders. It imports nothing of moe-upcycle but its error types."""

from .formats import PICKLE_SUFFIXES, SAFE_INDEX, SAFE_SINGLE
from .output import MARKER, atomic_folder, check_output, copy_side_files, refuse_inputs
from .reader import SafetensorsCheckpoint, TensorInfo, raw_config, read_config, read_header
from .writer import PlannedTensor, check_planned, parse_size, write_sharded

__all__ = [
    "MARKER", "PICKLE_SUFFIXES", "SAFE_INDEX", "SAFE_SINGLE", "PlannedTensor", "SafetensorsCheckpoint", "TensorInfo",
    "atomic_folder", "check_output", "check_planned", "copy_side_files", "parse_size", "raw_config", "read_config",
    "read_header", "refuse_inputs", "write_sharded",
]
