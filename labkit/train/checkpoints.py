"""Checkpoint files of a training run: their names, safe writing and reading, the RNG state.

Writing (:func:`write_checkpoint`) survives a crash or a full disk at any instant: the state is
serialised with ``torch.save`` in memory, a SHA-256 of those bytes goes into the zip archive's
comment (``torch.load`` ignores it), and the bytes go to ``NAME.partial`` next to the target,
which is flushed, ``fsync``-ed and renamed over the target (then the folder is fsync-ed). A
reader therefore sees the old file or the new one, never half of one; a write that fails
(``ENOSPC``: no space left) removes its ``.partial`` and raises :class:`CheckpointWriteError`.

Reading (:func:`read_checkpoint`) checks the checksum before unpickling, so a truncated,
bit-flipped, empty or foreign file is a :class:`CheckpointError` (a ``ValueError``) whose one-line
message names the file, what is wrong with it and what to do, never an error from deep inside
torch's zip reader. Files without a checksum (older labkit, plain ``torch.save``) still load.

A checkpoint must restore every random number generator (Python, NumPy, torch on the CPU and
every GPU) for a resumed run to draw the same dropout masks as the uninterrupted one.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

_CHECKPOINT_NAME = re.compile(r"step_(\d+)\.pt")
_PARTIAL_SUFFIX = ".partial"
# The zip comment that carries the checksum: b"labkit-sha256:" + 64 hex digits.
_MAGIC = b"labkit-sha256:"
_COMMENT_LEN = len(_MAGIC) + 64
_EOCD = b"PK\x05\x06"  # the zip "end of central directory" record: 22 bytes + the comment
_EOCD_LEN = 22
_CHUNK = 1 << 20  # bytes per write call
DAMAGED_FIX = "delete it (a run resumes from its previous checkpoint) or train again"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, damaged, foreign, or of another run."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. no space left); the previous checkpoint is intact."""

    def __init__(self, path: Path, error: OSError) -> None:
        reason = error.strerror or str(error)
        super().__init__(
            error.errno,
            f"could not write checkpoint {str(path)!r}: {reason}; the previous checkpoint is "
            "intact" + ("; free some disk space" if error.errno == errno.ENOSPC else ""),
        )
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return self.strerror


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """Where the checkpoint after ``step`` goes: ``directory/step_0000123.pt``."""
    return Path(directory) / f"step_{step:07d}.pt"


def checkpoint_step(path: str | Path) -> int | None:
    """The step in a ``step_0000123.pt`` name (123), None for any other name."""
    match = _CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoints in ``directory``, oldest step first ([] if there are none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(step, p) for p in directory.iterdir() if (step := checkpoint_step(p)) is not None]
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint in ``directory``, or None.

    Resume the latest run in a folder with ``fit(resume_from=latest_checkpoint(folder))``
    (None starts afresh, so one script serves the first start and every restart).
    """
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(directory: str | Path, keep: int, protect: Iterable[Path] = ()) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints of ``directory`` (and any in ``protect``,
    e.g. the best one), plus leftover ``.partial`` files of writes that never finished (a run
    killed mid-write). Returns the deleted checkpoints."""
    protected = {Path(p).name for p in protect}
    checkpoints = list_checkpoints(directory)
    old = [p for p in checkpoints[: max(len(checkpoints) - keep, 0)] if p.name not in protected]
    for path in old:
        path.unlink(missing_ok=True)
    for partial in Path(directory).glob(f"step_*.pt{_PARTIAL_SUFFIX}"):
        partial.unlink(missing_ok=True)
    return old


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

_write = os.write  # one indirection, so a test can make the disk fill up part-way


def _with_checksum(data: bytes) -> bytes:
    """``data`` (a zip archive without a comment) with its SHA-256 as the archive comment."""
    if len(data) < _EOCD_LEN or data[-_EOCD_LEN:-18] != _EOCD or data[-2:] != b"\0\0":
        return data  # not the layout torch.save writes: store it as it is
    comment = _MAGIC + hashlib.sha256(data).hexdigest().encode("ascii")
    return data[:-2] + len(comment).to_bytes(2, "little") + comment


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (not possible on every system: then skipped)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: temporary file, fsync, rename.

    Raises :class:`CheckpointWriteError` when the disk refuses (full, read-only, ...); the
    temporary file is removed and whatever ``path`` held before is untouched.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = _with_checksum(buffer.getvalue())
    partial = path.with_name(path.name + _PARTIAL_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = _write(fd, view[:_CHUNK])
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
    except BaseException as error:  # a full disk, or a second Ctrl-C: leave no half file
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointWriteError(path, error) from error
        raise
    _fsync_directory(path.parent)
    return path


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _checksum_problem(data: bytes) -> str | None:
    """What is wrong with ``data``'s checksum, or None if it matches or there is none."""
    tail = len(data) - _COMMENT_LEN
    if tail < _EOCD_LEN or data[tail:].find(_MAGIC) != 0:
        return None  # no labkit checksum: an older or foreign file
    record = data[tail - _EOCD_LEN : tail]
    if record[:4] != _EOCD or int.from_bytes(record[-2:], "little") != _COMMENT_LEN:
        return None
    original = data[: tail - 2] + b"\0\0"
    expected = data[tail + len(_MAGIC) :].decode("ascii", errors="replace")
    if hashlib.sha256(original).hexdigest() != expected:
        return "its checksum does not match: bytes changed or went missing after it was written"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 120 else line[:117] + "..."


def read_checkpoint(
    path: str | Path, map_location: Any = "cpu", *, fix: str = DAMAGED_FIX
) -> dict[str, Any]:
    """The dict saved in the checkpoint ``path`` (``torch.load(weights_only=True)``), verified.

    Raises :class:`CheckpointError` naming the file, the problem and ``fix`` (what to do) when
    the file is missing, empty, truncated, corrupted or not a dict saved by ``torch.save``.
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    if not path.is_file():
        raise CheckpointError(f"{where} does not exist")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{where} cannot be read ({error.strerror})") from None
    if not data:
        raise CheckpointError(f"{where} is empty (0 bytes: a write that never finished?); {fix}")
    problem = _checksum_problem(data)
    if problem:
        raise CheckpointError(f"{where} is damaged ({problem}); {fix}")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # torch, zipfile, pickle, unicode...: one message for all
        raise CheckpointError(
            f"{where} is damaged or not a torch checkpoint ({_first_line(error)}); {fix}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{where} holds a {type(state).__name__}, not the dict of a labkit checkpoint; {fix}"
        )
    return state


# ---------------------------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and every GPU) RNG states, as types ``torch.load`` reads
    with ``weights_only=True``."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
