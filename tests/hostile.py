"""Helpers of the hostile-input tests: run the CLI (in-process or as a subprocess), check that a failure is one
``moe-upcycle: error:`` line without a traceback, hash a folder tree before and after, and corrupt safetensors files.

The invariants (``tests/test_invariants.py``, ``tests/test_kill.py``):

* a bad input ends with a non-zero exit status and one clear error line on stderr, never a traceback;
* no file outside a fresh output is created, changed or removed: after a failure the tree is byte-identical,
  after a success the only new path is the output (and parent folders created for it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import signal
import stat
import struct
import subprocess
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ERROR_LINE = re.compile(r"^moe-upcycle(?: [a-z]+)?: error: \S")
MAX_ERROR_CHARS = 1000


@dataclass
class Outcome:
    """What one run of the command line did."""

    argv: list[str]
    code: int | None  # None: an exception escaped main()
    out: str
    err: str
    exc: str | None = None  # the escaped exception's traceback (in-process runs)

    def describe(self) -> str:
        tail = "\n".join(self.err.strip().splitlines()[-15:])
        text = f"argv: {self.argv}\nexit status: {self.code}\nstderr (last lines):\n{tail}"
        if self.exc:
            text += "\nescaped exception:\n" + "\n".join(self.exc.strip().splitlines()[-6:])
        return text


def _exit_code(value) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    return 1  # sys.exit("message") prints the message and exits 1


def run_inprocess(argv: Sequence[str], capfd) -> Outcome:
    """``moe_upcycle.cli.main(argv)`` with fd-level capture: what a subprocess would see, without its start-up cost.

    An exception escaping ``main`` is what the interpreter would print as a traceback: it is recorded, not raised.
    """
    from moe_upcycle.cli import main

    argv = [str(a) for a in argv]
    capfd.readouterr()
    exc = None
    try:
        code = _exit_code(main(argv))
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException:  # noqa: BLE001 - the point is to see anything that would end in a traceback
        code, exc = None, traceback.format_exc()
    out, err = capfd.readouterr()
    return Outcome(argv, code, out, err, exc)


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def run_subprocess(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300,
                   preexec_fn=None) -> Outcome:
    """``python -m moe_upcycle.cli argv`` in a real process."""
    argv = [str(a) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "moe_upcycle.cli", *argv], capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout, preexec_fn=preexec_fn)
    return Outcome(argv, proc.returncode, proc.stdout, proc.stderr)


def failure_problems(outcome: Outcome) -> list[str]:
    """What is wrong with ``outcome`` as the answer to a bad input (empty: a clean failure)."""
    problems = []
    if outcome.exc is not None:
        problems.append("an exception escaped main() (a traceback for the user): "
                        + outcome.exc.strip().splitlines()[-1][:300])
    elif outcome.code == 0:
        problems.append("exit status 0 on a bad input")
    if "Traceback" in outcome.err or "Traceback" in outcome.out:
        problems.append("'Traceback' in the output")
    lines = [line for line in outcome.err.splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_LINE.match(line)]
    if outcome.exc is None and outcome.code != 0:
        if len(errors) != 1:
            problems.append(f"{len(errors)} 'moe-upcycle: error:' lines on stderr (expected exactly one)")
        elif lines[-1] != errors[0]:
            problems.append(f"the error line is not the last line of stderr (then: {lines[-1][:200]!r})")
        elif len(errors[0]) > MAX_ERROR_CHARS:
            problems.append(f"the error line is {len(errors[0])} characters long")
    return problems


def success_problems(outcome: Outcome) -> list[str]:
    problems = []
    if outcome.exc is not None:
        problems.append("an exception escaped main(): " + outcome.exc.strip().splitlines()[-1][:300])
    elif outcome.code != 0:
        problems.append(f"exit status {outcome.code}")
    if "Traceback" in outcome.err:
        problems.append("'Traceback' on stderr")
    return problems


def error_line(outcome: Outcome) -> str:
    lines = [line for line in outcome.err.splitlines() if ERROR_LINE.match(line)]
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------------------------- file-tree hashes
Snapshot = dict[str, tuple]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def snapshot(root: Path) -> Snapshot:
    """Every path under ``root`` (relative, ``root`` itself is ``.``): kind, permission bits and content hash."""
    root = Path(root)
    entries: Snapshot = {}

    def record(path: Path) -> None:
        rel = str(path.relative_to(root)) if path != root else "."
        st = path.lstat()
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            entries[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            entries[rel] = ("dir", oct(mode))
        elif stat.S_ISREG(st.st_mode):
            entries[rel] = ("file", oct(mode), st.st_size, _sha256(path))
        else:
            entries[rel] = ("other", oct(mode))

    record(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames) + sorted(filenames):
            record(Path(dirpath) / name)
    return entries


def tree_problems(root: Path, before: Snapshot, after: Snapshot, fresh: Path | None = None) -> list[str]:
    """Paths created, removed or changed between ``before`` and ``after``, except ``fresh`` (a new output) and the
    folders created to hold it. ``fresh`` is allowed only when it did not exist before."""
    allowed: set[str] = set()
    if fresh is not None:
        fresh_rel = os.path.relpath(Path(fresh).absolute(), Path(root).absolute())
        if not fresh_rel.startswith("..") and fresh_rel not in before:
            allowed.add(fresh_rel)
            parent = os.path.dirname(fresh_rel)
            while parent and parent not in before:
                allowed.add(parent)
                parent = os.path.dirname(parent)

    def ok(rel: str) -> bool:
        return any(rel == a or rel.startswith(a + os.sep) for a in allowed)

    created = sorted(p for p in after if p not in before and not ok(p))
    removed = sorted(p for p in before if p not in after)
    changed = sorted(p for p in before if p in after and before[p] != after[p] and p != ".")
    problems = []
    for label, paths in (("created", created), ("removed", removed), ("changed", changed)):
        if paths:
            shown = ", ".join(paths[:8]) + (f" (+{len(paths) - 8} more)" if len(paths) > 8 else "")
            problems.append(f"{label} outside a fresh output: {shown}")
    return problems


# ------------------------------------------------------------------------------------------------- safetensors
def read_raw(path: Path) -> tuple[dict, bytes]:
    """The header (a dict) and the data section of a well-formed safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_raw(path: Path, header, data: bytes, length: int | None = None) -> None:
    """Write ``header`` (any JSON value, or raw bytes) and ``data`` in the safetensors layout; ``length`` overrides the
    8-byte header length."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)


def first_tensor(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------ hostile environment
@contextmanager
def _while_set(setup: list[str], teardown: list[str], what: str) -> Iterator[None]:
    """Run ``setup``, yield, run ``teardown``; skip the test where ``setup`` is not allowed here."""
    import pytest

    done = subprocess.run(setup, capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"{what} is not available here: {done.stderr.decode().strip()[:100]}")
    try:
        yield
    finally:
        subprocess.run(teardown, capture_output=True)


def immutable(path: Path):
    """``chattr +i path`` (which stops root too) for the duration; skips the test where the attribute cannot be set."""
    return _while_set(["chattr", "+i", str(path)], ["chattr", "-i", str(path)], "chattr +i")


def tmpfs(path: Path, size: str = "16k", read_only: bool = False):
    """A tmpfs mounted at ``path`` (small for ENOSPC, or read-only for EROFS); skips where mounting is not allowed."""
    path.mkdir(exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    return _while_set(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], ["umount", "-l", str(path)],
                      "mounting a tmpfs")


@contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """Lower this process's soft RLIMIT_FSIZE (writes past it fail with EFBIG; SIGXFSZ ignored) for the duration."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _virtual_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def memory_limit(extra_bytes: int = 4 << 30) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``extra_bytes`` for the duration: a bad input that
    makes a command allocate without bound (a config whose defaults describe a 7B model) fails here with an
    allocation error instead of taking the machine's memory. No cap where ``/proc`` is missing."""
    current = _virtual_size()
    if not current:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = current + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


CHILD_MEMORY = 8 << 30


def limit_memory_in_child(nbytes: int = CHILD_MEMORY, file_size: int | None = None):
    """``preexec_fn`` of a subprocess with at most ``nbytes`` of address space (and, with ``file_size``, a file-size
    limit: writes past it fail with EFBIG)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, resource.getrlimit(resource.RLIMIT_AS)[1]))
        if file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply
