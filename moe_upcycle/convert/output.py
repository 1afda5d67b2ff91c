"""Atomic output folders: build in a temporary sibling folder, rename into place only on success."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output folder unless ``overwrite``; refuse a file in its place always."""
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} exists and is a file; choose another output folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputExistsError(f"{output} exists and is not empty; pass --overwrite to replace it, or choose another folder")


@contextmanager
def atomic_folder(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to ``output``; on success it replaces ``output``, on failure it is removed."""
    output = output.resolve()
    check_output(output, overwrite)
    created = [p for p in [output.parent, *output.parent.parents] if not p.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        check_output(output, overwrite)  # it may have appeared meanwhile
        if output.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, backup / "old")
            os.replace(tmp, output)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # innermost first
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Copy tokenizer files and ``generation_config.json`` from ``source``; return the names copied."""
    copied = []
    for name in (*TOKENIZER_FILES, "generation_config.json", "LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    for path in source.glob("*.tiktoken"):
        shutil.copyfile(path, target / path.name)
        copied.append(path.name)
    return copied
