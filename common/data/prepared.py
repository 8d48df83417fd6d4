"""The prepared-silo format: its constants and its one reader.

A directory written by ``fedrec data prepare`` (`common.data.prepare`) holds one
silo's files and the manifest ``silo.json``; `load_prepared_silo` reads it back,
validating every file, and `catalogue_size` reads only the catalogue's size. The
on-disk format is documented in ``docs/data-format.md``.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from common.data.silo import SiloData
from common.data.split import NO_ITEM, UserSplit
from common.errors import DataError, DataWarning

FORMAT: Final = "fedrec-silo"
FORMAT_VERSION: Final = 1
MANIFEST: Final = "silo.json"
TRAIN: Final = "train.parquet"
USERS: Final = "users.parquet"
NEGATIVES: Final = "negatives.npz"
ITEMS: Final = "items.parquet"
#: The data files of a silo directory, in the order they are written; the manifest
#: is written last, so a directory without ``silo.json`` is an unfinished one.
DATA_FILES: Final = (TRAIN, USERS, NEGATIVES, ITEMS)
#: Names of the per-silo directories a prepare writes: ``silo-0``, ``silo-1``, ...
SILO_DIR_PATTERN: Final = re.compile(r"silo-\d+")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_STRING_TYPES = (pa.string(), pa.large_string())
_COLUMNS: Final[dict[str, dict[str, pa.DataType]]] = {
    TRAIN: {"user_idx": pa.int64(), "item_idx": pa.int64()},
    USERS: {
        "user_idx": pa.int64(),
        "user_global_idx": pa.int64(),
        "user_id": pa.string(),
        "val_item": pa.int64(),
        "test_item": pa.int64(),
    },
    ITEMS: {
        "item_idx": pa.int64(),
        "item_id": pa.string(),
        "popularity": pa.float64(),
        "category": pa.int64(),
    },
}


def is_prepared_silo(path: Path) -> bool:
    """Whether ``path`` is a silo directory (it holds ``silo.json``)."""
    return (Path(path) / MANIFEST).is_file()


def reject_prepared_root(path: Path, partition_id: int) -> None:
    """Raise if ``path`` is the output directory of a prepare, not one silo's.

    Raises
    ------
    DataError
        If ``path`` holds ``silo-<k>/silo.json`` directories.
    """
    path = Path(path)
    if any(
        SILO_DIR_PATTERN.fullmatch(p.name) and is_prepared_silo(p)
        for p in path.iterdir()
        if p.is_dir()
    ):
        raise DataError(
            f"{path} holds prepared silo directories but is not one itself (no "
            f"{MANIFEST}); set data-path to this silo's own directory, e.g. "
            f"{path / f'silo-{partition_id}'}"
        )


def load_prepared_silo(
    path: Path,
    *,
    partition_id: int | None = None,
    num_partitions: int | None = None,
    seed: int | None = None,
    eval_negatives: int | None = None,
) -> SiloData:
    """Load and validate a silo directory written by ``fedrec data prepare``.

    Parameters
    ----------
    path : Path
        The silo's directory (holding ``silo.json``).
    partition_id, num_partitions : int or None
        If given, the manifest's silo id and silo count must equal them.
    seed, eval_negatives : int or None
        If given and unequal to the manifest's, a `DataWarning` says that the
        held-out items and negatives are the prepared ones.

    Returns
    -------
    SiloData
        The silo's split, equal to what simulation gives partition ``silo-id``
        with the prepare-time seed, and the catalogue's item popularity.

    Raises
    ------
    DataError
        Naming the file and the problem: a missing file, an unsupported format
        version, a checksum, dtype, shape or count that does not match the
        manifest, an index out of range, or the wrong silo.
    """
    path = Path(path)
    manifest = _read_manifest(path / MANIFEST)
    m_path = path / MANIFEST
    silo_id, n_silos = manifest["silo-id"], manifest["num-silos"]
    if (
        partition_id is not None
        and num_partitions is not None
        and ((silo_id, n_silos) != (partition_id, num_partitions))
    ):
        raise DataError(
            f"{m_path}: this directory holds silo {silo_id} of {n_silos}, but the "
            f"node config says partition-id={partition_id}, "
            f"num-partitions={num_partitions}; "
            f"point data-path at silo-{partition_id} of a prepare with "
            f"{num_partitions} silos, or fix --node-config"
        )
    for key, given in (("seed", seed), ("eval-negatives", eval_negatives)):
        if given is not None and given != manifest[key]:
            warnings.warn(
                f"{m_path}: prepared with {key} {manifest[key]} but the run has "
                f"{given}; held-out items and evaluation negatives are the prepared "
                f"ones, so they differ from a simulation with {key} {given}",
                DataWarning,
                stacklevel=2,
            )
    for name, meta in manifest["files"].items():
        _verify_file(path / name, meta)
    counts = manifest["counts"]
    n_users, n_items = counts["users"], counts["items"]
    n_neg = manifest["eval-negatives"]
    cat = f"the catalogue has {n_items} items, counts.items in {MANIFEST}"

    items = _read_table(path / ITEMS, n_items)
    _check_range(path / ITEMS, "item_idx", items["item_idx"], 0, n_items)
    if not np.array_equal(items["item_idx"], np.arange(n_items)):
        raise DataError(f"{path / ITEMS}: item_idx must be 0..{n_items - 1} in order")
    _check_unique(path / ITEMS, "item_id", items["item_id"])
    popularity = items["popularity"].astype(np.float64)
    if not (np.isfinite(popularity).all() and (popularity >= 0).all()):
        raise DataError(f"{path / ITEMS}: popularity must be finite and >= 0")
    _check_range(path / ITEMS, "category", items["category"], -1, None)

    users = _read_table(path / USERS, n_users)
    if not np.array_equal(users["user_idx"], np.arange(n_users)):
        raise DataError(f"{path / USERS}: user_idx must be 0..{n_users - 1} in order")
    _check_range(path / USERS, "user_global_idx", users["user_global_idx"], 0, None)
    _check_unique(path / USERS, "user_global_idx", users["user_global_idx"])
    _check_unique(path / USERS, "user_id", users["user_id"])
    for column, key in (("val_item", "val-items"), ("test_item", "test-items")):
        held = users[column]
        _check_range(path / USERS, column, held, NO_ITEM, n_items, cat)
        if int((held != NO_ITEM).sum()) != counts[key]:
            raise DataError(
                f"{path / USERS}: {int((held != NO_ITEM).sum())} users have a "
                f"{column}, but {MANIFEST} counts.{key} says {counts[key]}"
            )
    if not np.array_equal(users["val_item"] == NO_ITEM, users["test_item"] == NO_ITEM):
        raise DataError(
            f"{path / USERS}: a user has a val_item but no test_item or the reverse"
        )

    train = _read_table(path / TRAIN, counts["train-interactions"])
    _check_range(path / TRAIN, "user_idx", train["user_idx"], 0, n_users)
    _check_range(path / TRAIN, "item_idx", train["item_idx"], 0, n_items, cat)

    negatives = _read_negatives(path / NEGATIVES, (n_users, n_neg), n_items)
    split = UserSplit(
        num_items=n_items,
        train_user=train["user_idx"],
        train_item=train["item_idx"],
        val_item=users["val_item"],
        test_item=users["test_item"],
        val_negatives=negatives["val"],
        test_negatives=negatives["test"],
        user_global_idx=users["user_global_idx"],
    )
    return SiloData(split, popularity)


def silo_counts(path: Path) -> dict[int, dict[str, int]] | None:
    """``silo-id`` → the ``counts`` of every silo manifest under a prepared root.

    None when ``path`` is not the output directory of ``fedrec data prepare``.

    Raises
    ------
    DataError
        Naming the manifest that is unreadable or malformed.
    """
    if not path.is_dir():
        return None
    manifests = sorted(p / MANIFEST for p in path.iterdir() if SILO_DIR_PATTERN.fullmatch(p.name))
    manifests = [m for m in manifests if m.is_file()]
    if not manifests:
        return None
    out: dict[int, dict[str, int]] = {}
    for manifest_path in manifests:
        manifest = _read_manifest(manifest_path)
        out[int(manifest["silo-id"])] = {k: int(v) for k, v in manifest["counts"].items()}
    return out


def catalogue_size(path: Path) -> int | None:
    """Items in the shared catalogue, from the manifest of prepared silo data.

    Reads only ``counts.items`` of the manifest, so a server needs neither the
    interactions nor the silo's data files.

    Parameters
    ----------
    path : Path
        A silo directory written by ``fedrec data prepare`` (it holds
        ``silo.json``), or the output directory of a prepare (then the first
        ``silo-*/silo.json`` in sorted order is read).

    Returns
    -------
    int or None
        The number of items; None if ``path`` is not a directory or holds no
        prepared silo data.

    Raises
    ------
    DataError
        Naming the manifest, if it cannot be read or has no integer
        ``counts.items``.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    for manifest in (path / MANIFEST, *sorted(path.glob(f"silo-*/{MANIFEST}"))[:1]):
        if manifest.is_file():
            try:
                return int(json.loads(manifest.read_text())["counts"]["items"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DataError(
                    f"{manifest}: cannot read the catalogue size ({exc})"
                ) from None
    return None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, hex, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict[str, Any]:
    """Read ``silo.json`` and check every key the loader relies on."""
    if not path.is_file():
        raise DataError(
            f"{path}: missing; {path.parent} is not a prepared silo directory (run "
            "fedrec data prepare, or finish copying the directory)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(
            f"{path}: expected a JSON object, got {type(manifest).__name__}"
        )
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}; this "
            "is not a silo manifest written by fedrec data prepare"
        )
    version = manifest.get("format-version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise DataError(
            f"{path}: format-version {version!r} is not supported; this fedrec reads "
            f"version {FORMAT_VERSION}: prepare the data again with this fedrec"
        )
    n_silos = _manifest_int(path, manifest, "num-silos", 1)
    _manifest_int(path, manifest, "silo-id", 0, n_silos - 1)
    _manifest_int(path, manifest, "seed", 0)
    _manifest_int(path, manifest, "eval-negatives", 1)
    name = manifest.get("silo-name")
    if name is not None and not isinstance(name, str):
        raise DataError(f"{path}: silo-name must be a string or null, got {name!r}")
    counts = _manifest_object(path, manifest, "counts")
    for key in ("users", "train-interactions", "val-items", "test-items", "items"):
        _manifest_int(path, counts, key, 0, where="counts.")
    files = _manifest_object(path, manifest, "files")
    if set(files) != set(DATA_FILES):
        raise DataError(
            f"{path}: files lists {sorted(files)}, expected {sorted(DATA_FILES)}"
        )
    for name, meta in files.items():
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("sha256"), str)
            and _SHA256.fullmatch(meta["sha256"])
        ):
            raise DataError(f"{path}: files.{name}.sha256 must be a hex SHA-256")
        _manifest_int(path, meta, "bytes", 0, where=f"files.{name}.")
    return manifest


def _manifest_object(
    path: Path, manifest: Mapping[str, Any], key: str
) -> dict[str, Any]:
    """Return the JSON object under ``key``."""
    value = manifest.get(key)
    if not isinstance(value, dict):
        raise DataError(f"{path}: {key} must be a JSON object, got {value!r}")
    return value


def _manifest_int(
    path: Path,
    obj: Mapping[str, Any],
    key: str,
    lo: int,
    hi: int | None = None,
    *,
    where: str = "",
) -> int:
    """Return the integer in ``[lo, hi]`` under ``key`` (``where``: key prefix)."""
    value = obj.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < lo
        or (hi is not None and value > hi)
    ):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise DataError(
            f"{path}: {where}{key} must be an integer {bound}, got {value!r}"
        )
    return value


def _verify_file(path: Path, meta: Mapping[str, Any]) -> None:
    """Check that a data file exists and matches the manifest's size and SHA-256."""
    if not path.is_file():
        raise DataError(
            f"{path}: missing; the silo directory is incomplete: copy it again from "
            "the output of fedrec data prepare"
        )
    size = path.stat().st_size
    if size != meta["bytes"] or file_sha256(path) != meta["sha256"]:
        raise DataError(
            f"{path}: contents do not match {MANIFEST} ({size} bytes, manifest says "
            f"{meta['bytes']}; or the SHA-256 differs): the file is corrupted or was "
            "modified; copy it again from the output of fedrec data prepare"
        )


def _read_table(path: Path, rows: int) -> dict[str, NDArray[Any]]:
    """Read a Parquet file of the format, checking columns, types, nulls and rows."""
    want = _COLUMNS[path.name]
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from None
    found = dict(zip(table.schema.names, table.schema.types, strict=True))
    if set(found) != set(want):
        raise DataError(f"{path}: has columns {sorted(found)}, expected {sorted(want)}")
    for name, dtype in want.items():
        ok = (
            found[name] in _STRING_TYPES
            if dtype == pa.string()
            else found[name] == dtype
        )
        if not ok:
            raise DataError(
                f"{path}: column {name!r} has type {found[name]}, expected {dtype}"
            )
        if table.column(name).null_count:
            raise DataError(f"{path}: column {name!r} has missing values")
    if table.num_rows != rows:
        raise DataError(
            f"{path}: has {table.num_rows} rows, but {MANIFEST} counts say {rows}"
        )
    out: dict[str, NDArray[Any]] = {}
    for name, dtype in want.items():
        values = table.column(name).to_numpy()
        out[name] = (
            np.asarray(values, dtype=object)
            if dtype == pa.string()
            else np.array(values, dtype=dtype.to_pandas_dtype())
        )
    return out


def _read_negatives(
    path: Path, shape: tuple[int, int], num_items: int
) -> dict[str, NDArray[np.int64]]:
    """Read ``negatives.npz``: ``val`` and ``test``, (U, n) int64 item indices."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read as a .npz archive: {exc}") from None
    if set(arrays) != {"val", "test"}:
        raise DataError(
            f"{path}: holds arrays {sorted(arrays)}, expected ['test', 'val']"
        )
    for key, arr in arrays.items():
        if arr.dtype != np.int64 or arr.shape != shape:
            raise DataError(
                f"{path}: array {key!r} is {arr.dtype} {arr.shape}, expected int64 "
                f"{shape} (users x eval-negatives from {MANIFEST})"
            )
        _check_range(
            path, key, arr, 0, num_items, f"the catalogue has {num_items} items"
        )
    return arrays


def _check_range(
    path: Path,
    name: str,
    values: NDArray[np.int64],
    lo: int,
    hi: int | None,
    what: str = "",
) -> None:
    """Raise unless ``lo <= values < hi`` (``hi=None``: no upper bound).

    ``what`` explains the bound in the message, e.g. the catalogue size.
    """
    if len(values) == 0:
        return
    bad = (values < lo) | (values >= hi) if hi is not None else values < lo
    if bad.any():
        value = values[np.unravel_index(int(np.argmax(bad)), values.shape)]
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi - 1}]"
        raise DataError(
            f"{path}: {name} value {int(value)} is out of range: every value must be "
            f"{bound}{f' ({what})' if what else ''}"
        )


def _check_unique(path: Path, name: str, values: NDArray[Any]) -> None:
    """Raise if a column has a repeated value."""
    keys = values.astype(str) if values.dtype == object else values
    uniq, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        raise DataError(
            f"{path}: {name} {uniq[counts > 1][0]!r} appears more than once"
        )
