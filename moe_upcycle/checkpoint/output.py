"""Atomic output folders: build in a temporary sibling folder, rename into place only on success.

Safety rules (each one a test in tests/test_output_safety.py):

- an output never is, contains or lies inside an input of the command when it has to be replaced;
- ``overwrite`` replaces only a folder that moe-upcycle wrote (it holds :data:`MARKER`, or is an upcycled model
  written before markers existed), never an arbitrary folder;
- the temporary folder (``.OUT.tmp-*``) and the backup of a replaced output (``.OUT.old-*``) hold :data:`MARKER`,
  locked with ``flock`` while their run is alive; the next run into the same OUTPUT removes those whose lock
  is free (the run died), and if a run died between moving the old output away and the new one in, it puts
  the old output back first, so OUTPUT is never left missing;
- the final swap happens under a lock of the parent folder, so two runs racing into one OUTPUT cannot both
  replace it, and the loser says so;
- the finished folder gets the permissions the user's umask gives a new folder (``mkdtemp`` makes 0700);
- file-system errors (disk full, file too large, read-only or missing parent, name too long) end as one
  :class:`~moe_upcycle.errors.OutputError` line, and the temporary folder is removed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import OutputError, OutputExistsError
from .formats import PICKLE_SUFFIXES, SAFE_INDEX

try:  # POSIX; elsewhere stale folders are left for the user
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger("moe_upcycle")

MARKER = ".moe-upcycle"
_FIXES = {
    errno.ENOSPC: "free some space or choose a folder on another disk",
    errno.EDQUOT: "free some space or choose a folder on another disk",
    errno.EFBIG: "the file system limits file sizes: pass a smaller --max-shard-size or choose another disk",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.ENAMETOOLONG: "choose a shorter output name",
    errno.ENOTDIR: "a part of the output path is a file: choose another folder",
    errno.EEXIST: "a part of the output path is a file: choose another folder",
}


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _looks_like_ours(folder: Path) -> bool:
    """A folder moe-upcycle wrote: it holds the marker, or (written before markers) an upcycled model's config."""
    if (folder / MARKER).is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "upcycled_moe"


def check_output(output: Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse, before any work, an output that would lose data or cannot be a folder.

    ``inputs``: every local file or folder the command reads; an output equal to one, containing one, or (when it
    exists and would be replaced) inside one is refused whatever ``overwrite`` says.
    """
    try:
        _check_output(Path(output).absolute(), overwrite, inputs)
    except OutputError:
        raise
    except OSError as err:  # e.g. a name too long for the file system
        raise _output_error(Path(output), err) from None


def refuse_inputs(output: Path, inputs: Sequence[str | Path], name: str = "the output", fresh_inside: bool = True) -> None:
    """Refuse an ``output`` that is or contains one of the command's ``inputs``, or lies inside one (allowed when
    ``fresh_inside`` and ``output`` does not exist yet: writing a new folder there changes nothing of the input)."""
    resolved = Path(output).resolve()
    for item in inputs:
        source = Path(item).resolve()
        if _inside(source, resolved):
            what = "is" if source == resolved else "contains"
            raise OutputExistsError(f"{name} {output} {what} the input {item}: write the result somewhere else")
        if _inside(resolved, source) and source.is_dir() and (resolved.exists() or not fresh_inside):
            raise OutputExistsError(f"{name} {output} lies inside the input {item}, which writing there would change: "
                                    "choose a place outside it")


def _check_output(output: Path, overwrite: bool, inputs: Sequence[str | Path]) -> None:
    refuse_inputs(output, inputs)
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot create {output}: {parent} is a file, not a folder; choose another output folder")
            break
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} exists and is a file; choose another output folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{output} exists and is not empty; pass --overwrite to replace it, or choose another folder")
        if not _looks_like_ours(output):
            found = ", ".join(sorted(p.name for p in output.iterdir())[:5])
            raise OutputExistsError(f"{output} was not written by moe-upcycle (it holds {found}); --overwrite replaces "
                                    "only moe-upcycle outputs: remove it yourself or choose another folder")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _lock(path: Path, blocking: bool = True):
    """An open file descriptor of ``path`` holding an exclusive ``flock``, or None if another process holds it."""
    fd = os.open(path, os.O_RDONLY)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _marked_folder(parent: Path, prefix: str) -> tuple[Path, int]:
    """A new folder ``parent/prefix*`` holding :data:`MARKER`, locked for the life of this process's use of it."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    marker = folder / MARKER
    marker.write_text(json.dumps({"written_by": "moe-upcycle", "pid": os.getpid()}) + "\n")
    return folder, _lock(marker)


def _remove(folder: Path) -> None:
    """Remove a folder of ours, its :data:`MARKER` last: a run killed meanwhile leaves a folder still marked as ours,
    which the next run removes."""
    for entry in folder.iterdir():
        if entry.name != MARKER:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    shutil.rmtree(folder)


def _release(fd: int | None) -> None:
    if fd is not None:
        with suppress(OSError):
            os.close(fd)


def clean_stale(output: Path) -> list[Path]:
    """Remove our temporary and backup folders of ``output`` left by runs that died; restore a missing OUTPUT.

    A folder is ours when it holds :data:`MARKER`, never by its name alone, and stale when no process holds the
    marker's lock. Returns the folders removed.
    """
    if fcntl is None or not output.parent.is_dir():
        return []
    removed = []
    candidates = sorted(output.parent.glob(f".{output.name}.old-*")) + sorted(output.parent.glob(f".{output.name}.tmp-*"))
    for folder in candidates:
        marker = folder / MARKER
        if not folder.is_dir() or folder.is_symlink():
            continue
        if not marker.is_file():  # killed between creating the folder and marking it: empty, nothing to lose
            with suppress(OSError):
                folder.rmdir()
            continue
        fd = _lock(marker, blocking=False)
        if fd is None:  # a live run owns it
            continue
        try:
            old = folder / "old"
            if folder.name.startswith(f".{output.name}.old-") and old.is_dir() and not output.exists():
                os.replace(old, output)  # died between moving the old output away and the new one in
                logger.warning("restored %s from an interrupted --overwrite", output)
            _remove(folder)
            removed.append(folder)
            logger.warning("removed %s, left by an interrupted run", folder)
        finally:
            _release(fd)
    return removed


def _output_error(output: Path, err: OSError) -> OutputError:
    fix = _FIXES.get(err.errno, "check the output folder")
    where = f" ({err.filename})" if err.filename else ""
    return OutputError(f"cannot write {output}: {err.strerror or err}{where}; {fix}. Nothing was written")


@contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    fd = _lock(parent)
    try:
        yield
    finally:
        _release(fd)


@contextmanager
def atomic_folder(output: Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder next to ``output``; on success it replaces ``output``, on failure it is removed.

    See the module docstring for the rules; ``inputs`` are the command's local inputs (see :func:`check_output`).
    """
    output = Path(output).absolute()
    check_output(output, overwrite, inputs)
    created = [p for p in [output.parent, *output.parent.parents] if not p.exists()]
    tmp, fd, backup_fd = None, None, None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with _parent_lock(output.parent):
            clean_stale(output)
        check_output(output, overwrite, inputs)  # a restored output is checked like any other
        tmp, fd = _marked_folder(output.parent, f".{output.name}.tmp-")
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        with _parent_lock(output.parent):
            check_output(output, overwrite, inputs)  # it may have appeared meanwhile
            if output.exists():
                backup, backup_fd = _marked_folder(output.parent, f".{output.name}.old-")
                os.replace(output, backup / "old")
                os.replace(tmp, output)
                tmp = None
                with suppress(OSError):
                    _remove(backup)
            else:
                os.replace(tmp, output)
                tmp = None
    except OSError as err:
        if err.errno == errno.ENOTEMPTY:
            raise OutputExistsError(f"{output} was written by another run at the same time; nothing was replaced") from None
        raise _output_error(output, err) from None
    finally:
        _release(fd)
        _release(backup_fd)
        if tmp is not None:
            with suppress(OSError):
                _remove(tmp)
            for parent in created:  # innermost first
                try:
                    parent.rmdir()
                except OSError:
                    break


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Copy the source's non-weight files that describe how to use the model; return the names copied.

    Every top-level file but weights (never pickles), the config, index and card that the caller writes itself,
    Python code (the output's code is ours), files of a training run (they describe the source's training, not the
    new model) and hidden files; plus the module folders that sentence-transformers' ``modules.json`` names
    (``1_Pooling/``, ``2_Normalize/``, ...). Files already in ``target`` are kept.
    """
    copied = []
    for path in sorted(source.iterdir()):
        name = path.name
        if (path.is_file() and not name.startswith(".") and not name.endswith(_NOT_COPIED_SUFFIXES)
                and name not in _NOT_COPIED and not (target / name).exists()):
            shutil.copyfile(path, target / name)
            copied.append(name)
    for folder in _sentence_transformers_folders(source):
        for path in sorted((source / folder).rglob("*")):
            if path.is_file() and not path.name.endswith(_NOT_COPIED_SUFFIXES):
                (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target / path.relative_to(source))
                copied.append(str(path.relative_to(source)))
    return copied


_NOT_COPIED_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES, ".h5", ".msgpack", ".onnx", ".gguf", ".py", ".pyc")
_NOT_COPIED = {"config.json", "README.md", SAFE_INDEX, "pytorch_model.bin.index.json",
               "trainer_state.json", "training_recipe.json", "eval_results.json", "train_results.json",
               "all_results.json", "expert_load.json", "expert_load.png", MARKER}


def _sentence_transformers_folders(source: Path) -> list[str]:
    """Sub-folders named by ``modules.json`` (relative, inside ``source``)."""
    try:
        modules = json.loads((source / "modules.json").read_text())
    except (OSError, ValueError):
        return []
    folders = []
    for module in modules if isinstance(modules, list) else []:
        path = module.get("path") if isinstance(module, dict) else None
        if isinstance(path, str) and path and (source / path).is_dir() and _inside((source / path).resolve(), source.resolve()):
            folders.append(path)
    return folders
