"""Atomic file writes and portable model checkpoints (.npz, no pickle)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

# numpy and flwr are imported by the array functions only, so the command line can
# write files atomically without loading them.


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write via a synced temporary file and an atomic rename, then sync the folder.

    The file is either the old one or the whole new one, never a truncated mix: a full
    disk or a crash mid-write leaves ``path`` as it was. It gets ``mode`` (default
    0600, :func:`tempfile.mkstemp`'s).

    Raises
    ------
    OSError
        As the system reported it (read-only file system, no space left...), with
        ``filename`` set to ``path`` when the failing call named no file or the
        temporary one.
    """
    try:
        _write_replace(path, data, mode)
    except OSError as exc:
        named = exc.filename is not None and not os.fspath(exc.filename).startswith(
            os.fspath(path.parent / f".{path.name}.")
        )
        if named or exc.errno is None:  # e.g. the folder that could not be created
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _write_replace(path: Path, data: bytes, mode: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_arrays(path: Path, arrays: ArrayRecord) -> None:
    """Atomically save an ArrayRecord as an ``.npz`` archive (one entry per name)."""
    import numpy as np

    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **{name: arr.numpy() for name, arr in arrays.items()})  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_arrays(path: Path) -> ArrayRecord:
    """Load an ArrayRecord saved by :func:`save_arrays`."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    with np.load(path, allow_pickle=False) as npz:
        return ArrayRecord({name: Array(npz[name]) for name in npz.files})
