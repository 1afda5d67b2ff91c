"""Where ``train`` and ``evaluate`` write: checked before any work, and left as it was when a run fails.

A training run writes into ``--output_dir`` as it goes (checkpoints, logs), unlike ``convert`` and ``merge``,
whose outputs appear atomically. So the folder is created and tried before the model loads, and a run that
fails removes the folder it created unless it holds a checkpoint to resume from.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from ..checkpoint import refuse_inputs
from ..errors import OutputError, OutputExistsError

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
"""``OSError`` numbers that only writing raises (disk full, quota, file-size limit)."""


def _is_write_error(err: OSError, folder: Path) -> bool:
    """Whether ``err`` came from writing into ``folder`` (not from reading an input)."""
    if err.errno in FULL_ERRNOS:
        return True
    return bool(err.filename) and folder in [Path(err.filename).absolute(), *Path(err.filename).absolute().parents]


def write_error(output: Path, err: OSError, flag: str) -> OutputError:
    """One line for an ``OSError`` met while creating or writing ``output``."""
    reason = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(output) else ""
    return OutputError(f"cannot write {flag} {output}: {reason}{where}; choose another place (one you can write to, "
                       "with free space and a short name)")


def _remove_created(created: list[Path]) -> None:
    """Remove the folders in ``created`` (innermost first): the first entirely, its parents if empty."""
    if created:
        shutil.rmtree(created[0], ignore_errors=True)
    for parent in created[1:]:
        try:
            parent.rmdir()
        except OSError:
            break


@contextmanager
def write_errors(output: Path, flag: str) -> Iterator[None]:
    """Turn a failure to write into ``output`` (an ``OSError`` of writing, or the I/O error safetensors raises as
    its own type) into one :class:`OutputError` line; other errors pass through."""
    try:
        yield
    except SafetensorError as err:
        reason = " ".join(str(err).split())
        raise OutputError(f"cannot write {flag} {output}: {reason}; choose another place (one you can write to, with "
                          "free space)") from None
    except OSError as err:
        if _is_write_error(err, Path(output).absolute()):
            raise write_error(output, err, flag) from None
        raise


@contextmanager
def run_folder(folder: Path, flag: str = "--output_dir") -> Iterator[Path]:
    """Create ``folder`` (if needed) and prove it writable now; on failure of the body, remove what was created.

    A folder this run created is removed entirely on failure, unless it holds a ``checkpoint-*`` folder (kept for
    ``--resume_from_checkpoint true``); a folder that existed is left in place. ``OSError`` numbers of
    writing (:func:`_is_write_error`) become one :class:`OutputError` line.
    """
    folder = Path(folder).absolute()
    created = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise write_error(folder, err, flag) from None
        with write_errors(folder, flag):
            yield folder
    except BaseException:
        if not any(folder.glob("checkpoint-*")):
            _remove_created(created)
        raise


def check_output_file(path: Path, flag: str, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse, before any work, a file that cannot be written: a folder, an input, in a missing or unwritable folder."""
    path = Path(path)
    try:
        if path.is_dir():
            raise OutputExistsError(f"{flag} {path} is a folder; give a file name such as {path / 'eval.json'}")
        refuse_inputs(path, inputs, flag, fresh_inside=False)
        folder = path.absolute().parent
        existing = next(p for p in [folder, *folder.parents] if p.exists())
        if not existing.is_dir():
            raise OutputExistsError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
        if existing != folder:
            raise OutputError(f"{flag} {path}: the folder {folder} does not exist; create it first or choose another path")
        if len(path.name.encode()) > os.pathconf(folder, "PC_NAME_MAX"):
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise write_error(path, err, flag) from None


def write_text(path: Path, text: str, flag: str) -> None:
    """Write ``text`` to ``path``; a file this call created is removed again if writing fails."""
    path = Path(path)
    existed = path.exists()
    try:
        path.write_text(text)
    except OSError as err:
        if not existed:
            path.unlink(missing_ok=True)
        raise write_error(path, err, flag) from None
