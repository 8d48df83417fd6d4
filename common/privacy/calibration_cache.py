"""σ calibration computed once per distinct input, across silos and runs.

Calibrating σ for a target ε (:func:`common.privacy.accounting.calibrate_noise`)
runs a numerical search over the accountant; with PLD it takes up to tens of
seconds, and every silo of a run (and every run of a sweep) with the same sample
rate, steps, ε, δ and accountant would repeat it for the identical answer.
:func:`calibrated` wraps the solver so that its result is stored on disk, keyed
by the solver's name and *all* of its arguments (whatever they are: a new
argument such as a neighbouring relation becomes part of the key without a
change here), plus :data:`CACHE_VERSION`.

Storage: one small JSON file per key in :func:`cache_dir` (``$FEDREC_CACHE_DIR``,
else ``$XDG_CACHE_HOME/fedrec``, else ``~/.cache/fedrec``, then
``sigma-calibration/``). Writes go to a temporary file in the same directory and
are renamed into place (atomic), so a reader never sees half a file; while one
process computes a key it holds an exclusive ``flock`` on the key's lock file, so
concurrent silos wait for it and then read the stored value instead of solving
again. A file that does not parse, or whose stored inputs differ from the key's
(a hash collision), is treated as a miss and rewritten. A cached σ is exactly the
float the solver returned for exactly these inputs (floats are keyed by their
hexadecimal form, not rounded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger("fedrec.privacy")

#: Bump when the solver's algorithm changes (tolerance, bracketing): old entries are then ignored.
CACHE_VERSION = 1
SUBDIR = "sigma-calibration"


def cache_dir() -> Path:
    """Where calibrations are stored (see module docstring)."""
    explicit = os.environ.get("FEDREC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser() / SUBDIR
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "fedrec" / SUBDIR


def _canonical(value: Any) -> Any:
    """A JSON-able form of an argument that distinguishes every distinct value exactly."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return {"float": value.hex()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"dataclass": type(value).__qualname__, "fields": fields}
    if isinstance(value, (tuple, list)):
        return {"seq": [_canonical(v) for v in value]}
    raise TypeError(f"σ calibration cache: cannot key an argument of type {type(value).__name__}")


def calibration_key(solver: Callable[..., float], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The inputs that identify one calibration (JSON-able, exact)."""
    return {
        "version": CACHE_VERSION,
        "solver": f"{solver.__module__}.{solver.__qualname__}",
        "args": [_canonical(a) for a in args],
        "kwargs": {k: _canonical(v) for k, v in sorted(kwargs.items())},
    }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read(file: Path, key: dict[str, Any]) -> float | None:
    try:
        entry = json.loads(file.read_text())
        if entry.get("key") != key:
            return None
        return float.fromhex(entry["sigma"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write(file: Path, key: dict[str, Any], sigma: float, seconds: float) -> None:
    entry = {"key": key, "sigma": float(sigma).hex(), "sigma_decimal": sigma, "solver_seconds": seconds}
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(entry, out, indent=1)
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def calibrated(
    solver: Callable[..., float],
    report: Callable[[str], None] | None = None,
    directory: Path | None = None,
) -> Callable[..., float]:
    """``solver`` with its results cached on disk (see module docstring).

    ``report`` receives the one-line ``σ calibration: cache hit/miss …`` message
    (default: the ``fedrec.privacy`` logger at INFO). ``directory`` overrides
    :func:`cache_dir`. If the cache directory cannot be written, the solver runs
    uncached and the message says so.
    """
    say = report or logger.info

    def run(*args: Any, **kwargs: Any) -> float:
        key = calibration_key(solver, args, kwargs)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        folder = directory if directory is not None else cache_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            file = folder / f"{digest}.json"
            with _locked(folder / f"{digest}.lock"):
                sigma = _read(file, key)
                if sigma is not None:
                    say(f"σ calibration: cache hit ({file})")
                    return sigma
                start = time.perf_counter()
                sigma = float(solver(*args, **kwargs))
                took = time.perf_counter() - start
                _write(file, key, sigma, took)
        except OSError as error:
            say(f"σ calibration: cache unavailable ({error}); solving uncached")
            return float(solver(*args, **kwargs))
        say(f"σ calibration: cache miss, solved in {took:.1f} s, stored in {file}")
        return sigma

    return run
