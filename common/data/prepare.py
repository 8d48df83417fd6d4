"""``fedrec data prepare``: write per-silo data directories, each read by one silo.

``prepare_silos`` makes the global leave-one-out split once (the one simulation
makes for the same seed), assigns users to silos and writes one directory per
silo in the format of `common.data.prepared`, whose ``load_prepared_silo`` reads
one back. The on-disk format is documented in ``docs/data-format.md``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from common.data.datasets import load_dataset
from common.data.loaders import load_interactions_file
from common.data.partition import Skew, partition_users
from common.data.prepared import (
    DATA_FILES,
    FORMAT,
    FORMAT_VERSION,
    ITEMS,
    MANIFEST,
    NEGATIVES,
    SILO_DIR_PATTERN,
    TRAIN,
    USERS,
    file_sha256,
)
from common.data.schema import Interactions
from common.data.silo import pooled_split
from common.data.split import NO_ITEM, UserSplit
from common.errors import ConfigError, DataError
from common.seeding import derive_seed
from common.storage import atomic_write_bytes

#: Data sets read from a file or directory (the synthetic one has no source file).
FILE_DATASETS: Final = ("ml-100k", "ml-1m", "csv", "parquet")

_INTEGER = re.compile(r"[+-]?\d{1,18}")


@dataclass(frozen=True, slots=True)
class PreparedSilo:
    """One silo directory written by `prepare_silos`.

    Parameters
    ----------
    silo_id : int
        The silo's ``partition-id``.
    name : str or None
        Its value of the silo column, or None when users were assigned by seed.
    path : Path
        The silo's directory.
    num_users, num_train, num_heldout : int
        Its users, training interactions, and users with validation/test items.
    files : tuple of str
        File names in the directory, manifest last.
    """

    silo_id: int
    name: str | None
    path: Path
    num_users: int
    num_train: int
    num_heldout: int
    files: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PrepareSummary:
    """What `prepare_silos` read and wrote.

    Parameters
    ----------
    out_dir : Path
        Directory holding ``silo-0/``, ``silo-1/``, ...
    dataset : str
        Format of the source (``ml-100k``, ``ml-1m``, ``csv`` or ``parquet``).
    source : Path
        The interaction file read.
    source_sha256 : str
        Its SHA-256, hex.
    num_interactions, num_users, num_items : int
        Size of the whole log and of the shared catalogue.
    seed, eval_negatives : int
        Run seed of the split (and partition) and negatives per held-out item.
    assignment : str
        How users were assigned, e.g. ``"5 silos by seed (iid)"``.
    silos : tuple of PreparedSilo
        One entry per silo, by silo id.
    """

    out_dir: Path
    dataset: str
    source: Path
    source_sha256: str
    num_interactions: int
    num_users: int
    num_items: int
    seed: int
    eval_negatives: int
    assignment: str
    silos: tuple[PreparedSilo, ...]


def prepare_silos(
    dataset: str,
    source: Path,
    out_dir: Path,
    *,
    silo_column: str | None = None,
    num_silos: int | None = None,
    seed: int,
    eval_negatives: int,
    skew: Skew = "iid",
    dirichlet_alpha: float = 0.5,
    user_col: str = "user_id",
    item_col: str = "item_id",
    timestamp_col: str = "timestamp",
    force: bool = False,
) -> PrepareSummary:
    """Split an interaction log into one directory per silo.

    The leave-one-out split is the global one of simulation
    (`common.data.silo.pooled_split`), made once here, so held-out items and
    evaluation negatives are fixed by ``seed``. Users go to silos either by the
    value of ``silo_column`` (silos numbered in sorted order of the values:
    numerically if every value is an integer, else as text) or by
    `common.data.partition.partition_users` with scheme ``silos`` and the seed
    simulation uses, so silo ``k`` holds exactly simulation's partition ``k``.

    Parameters
    ----------
    dataset : str
        ``"ml-100k"``, ``"ml-1m"``, ``"csv"`` or ``"parquet"``.
    source : Path
        MovieLens directory (or ratings file), or CSV/Parquet file.
    out_dir : Path
        Where to write ``silo-<k>/``; created if missing, and must be empty unless
        ``force``.
    silo_column : str or None
        CSV/Parquet column naming each row's silo; every user must have one value.
    num_silos : int or None
        Number of silos to assign users to by seed; exactly one of ``silo_column``
        and ``num_silos`` must be given.
    seed : int
        Run seed (``seed`` in the run config): it fixes the split and partition.
    eval_negatives : int
        Sampled negatives per held-out item (``data.eval-negatives``).
    skew, dirichlet_alpha
        Partition settings for ``num_silos`` (``data.skew``,
        ``data.dirichlet-alpha``).
    user_col, item_col, timestamp_col : str
        CSV/Parquet column names; MovieLens ignores them.
    force : bool
        Replace the ``silo-<k>/`` directories of an earlier run in ``out_dir``;
        other files there are left alone.

    Returns
    -------
    PrepareSummary
        What was read and written.

    Raises
    ------
    ConfigError
        If the arguments are inconsistent or ``out_dir`` is not empty.
    DataError
        If the data is malformed, a user appears under several silo values, or
        the users cannot be split into ``num_silos`` non-empty silos.
    """
    _check_arguments(dataset, silo_column, num_silos, seed, eval_negatives)
    out_dir = Path(out_dir)
    stale = _stale_silo_dirs(out_dir, force)
    interactions = load_dataset(
        dataset,
        Path(source),
        user_col=user_col,
        item_col=item_col,
        timestamp_col=timestamp_col,
    )
    data_file = Path(interactions.source)
    names: list[str] | None
    assignment: dict[str, Any]
    if num_silos is None:  # by column (_check_arguments: exactly one is given)
        column = str(silo_column)
        # Before the split: a bad column is the more basic error, and found sooner.
        parts, names = _parts_by_column(
            data_file, interactions, column, item_col, timestamp_col
        )
        pooled = pooled_split(interactions, eval_negatives=eval_negatives, seed=seed)
        assignment = {"method": "column", "column": column}
        described = f"{len(parts)} silos by column {column!r}"
    else:
        pooled = pooled_split(interactions, eval_negatives=eval_negatives, seed=seed)
        parts = partition_users(
            pooled.split,
            scheme="silos",
            num_partitions=num_silos,
            seed=derive_seed(seed, "partition"),
            skew=skew,
            alpha=dirichlet_alpha,
            item_category=interactions.item_category,
        )
        names = None
        assignment = {
            "method": "partition",
            "scheme": "silos",
            "skew": skew,
            "dirichlet-alpha": dirichlet_alpha,
        }
        described = f"{num_silos} silos by seed ({skew})"
    source_info = {
        "dataset": dataset,
        "file": data_file.name,
        "sha256": file_sha256(data_file),
        "bytes": data_file.stat().st_size,
    }
    items = _items_bytes(interactions, pooled.item_popularity)
    for path in stale:
        shutil.rmtree(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    silos = []
    created = datetime.now(UTC).isoformat(timespec="seconds")
    for k, users in enumerate(parts):
        name = names[k] if names is not None else None
        manifest = {
            "format": FORMAT,
            "format-version": FORMAT_VERSION,
            "silo-id": k,
            "num-silos": len(parts),
            "silo-name": name,
            "assignment": {
                **assignment,
                **({"value": name} if name is not None else {}),
            },
            "seed": seed,
            "eval-negatives": eval_negatives,
            "source": source_info,
            "created": created,
        }
        split = pooled.split.subset(users)
        silos.append(
            _write_silo(out_dir / f"silo-{k}", split, interactions, items, manifest)
        )
    return PrepareSummary(
        out_dir=out_dir,
        dataset=dataset,
        source=data_file,
        source_sha256=str(source_info["sha256"]),
        num_interactions=len(interactions),
        num_users=interactions.num_users,
        num_items=interactions.num_items,
        seed=seed,
        eval_negatives=eval_negatives,
        assignment=described,
        silos=tuple(silos),
    )

def _check_arguments(
    dataset: str,
    silo_column: str | None,
    num_silos: int | None,
    seed: int,
    eval_negatives: int,
) -> None:
    """Reject inconsistent or out-of-range arguments, naming the argument."""
    if dataset not in FILE_DATASETS:
        raise ConfigError(
            f"data set {dataset!r} cannot be prepared; expected one of {FILE_DATASETS}"
        )
    if (silo_column is None) == (num_silos is None):
        raise ConfigError(
            "give exactly one of silo_column (users' silos from a column) and "
            "num_silos (users assigned to N silos by seed)"
        )
    if silo_column is not None and dataset not in ("csv", "parquet"):
        raise ConfigError(
            f"silo_column needs a CSV or Parquet file; {dataset} has fixed columns "
            "(use num_silos)"
        )
    if silo_column is not None and not silo_column.strip():
        raise ConfigError("silo_column must be a non-empty column name")
    for name, value, lo in (
        ("num_silos", num_silos, 1),
        ("seed", seed, 0),
        ("eval_negatives", eval_negatives, 1),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")


def _stale_silo_dirs(out_dir: Path, force: bool) -> list[Path]:
    """Return the ``silo-<k>/`` directories to replace; raise if out_dir is taken."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(
            f"{out_dir} exists and is not a directory; choose another output directory"
        )
    entries = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if not entries:
        return []
    if not force:
        raise ConfigError(
            f"{out_dir} is not empty (it holds {entries[0].name}"
            f"{f' and {len(entries) - 1} more' if len(entries) > 1 else ''}); choose "
            "an empty or new output directory, or pass --force (force=True) to "
            "replace the silo-<k> directories of an earlier prepare"
        )
    known = {MANIFEST, *DATA_FILES}
    stale = [p for p in entries if p.is_dir() and SILO_DIR_PATTERN.fullmatch(p.name)]
    for silo_dir in stale:
        for f in silo_dir.iterdir():
            if f.name not in known and not f.name.startswith("."):
                raise ConfigError(
                    f"refusing to delete {silo_dir}: it holds {f.name}, which fedrec "
                    "data prepare does not write; move it away first"
                )
    return stale


def _parts_by_column(
    data_file: Path,
    interactions: Interactions,
    column: str,
    item_col: str,
    timestamp_col: str,
) -> tuple[list[NDArray[np.int64]], list[str]]:
    """Users of each silo, and the silo names, from a per-row silo column."""
    # Reading the log again with the silo column as "user" validates it like any ID
    # column (no missing or blank values) and keeps file row order.
    labels_log = load_interactions_file(
        data_file, user_col=column, item_col=item_col, timestamp_col=timestamp_col
    )
    if len(labels_log) != len(interactions):  # pragma: no cover - same file, same rows
        raise DataError(f"{data_file}: the file changed while it was being read")
    names = [str(v) for v in labels_log.user_ids]
    if all(_INTEGER.fullmatch(n) for n in names):
        order = sorted(range(len(names)), key=lambda i: int(names[i]))
    else:
        order = sorted(range(len(names)), key=lambda i: names[i])
    code = np.empty(len(names), dtype=np.int64)
    code[order] = np.arange(len(names))
    row_silo = code[labels_log.user_idx]  # (N,) silo of each row
    pairs = pd.DataFrame({"user": interactions.user_idx, "silo": row_silo})
    per_user = pairs.groupby("user")["silo"].nunique()
    split_users = per_user.index[per_user.to_numpy() > 1].to_numpy()
    if len(split_users):
        raise DataError(
            _several_silos_message(
                data_file, interactions, column, names, order, row_silo, split_users
            )
        )
    user_silo = np.empty(interactions.num_users, dtype=np.int64)
    user_silo[interactions.user_idx] = row_silo
    parts = [np.flatnonzero(user_silo == k).astype(np.int64) for k in range(len(names))]
    return parts, [names[i] for i in order]


def _several_silos_message(
    data_file: Path,
    interactions: Interactions,
    column: str,
    names: list[str],
    order: list[int],
    row_silo: NDArray[np.int64],
    split_users: NDArray[np.int64],
) -> str:
    """Name the first user found under several silo values, with a row for each."""
    first = int(split_users[0])
    rows = np.flatnonzero(interactions.user_idx == first)
    silos, first_rows = np.unique(row_silo[rows], return_index=True)
    text_file = data_file.suffix.lower() not in (".parquet", ".pq")
    where = [f"line {r + 2}" if text_file else f"row {r + 1}" for r in rows[first_rows]]
    values = ", ".join(
        f"{names[order[s]]!r} ({w})" for s, w in zip(silos.tolist(), where, strict=True)
    )
    more = f" ({len(split_users) - 1} more users too)" if len(split_users) > 1 else ""
    return (
        f"{data_file}: user {interactions.user_ids[first]!r} appears under several "
        f"{column} values: {values}{more}. Each user must belong to exactly one "
        f"silo: fix the {column} column, or, if these are different people, make "
        "their user IDs unique per silo (e.g. prefix them with the silo)"
    )


def _items_bytes(interactions: Interactions, popularity: NDArray[np.float64]) -> bytes:
    """Serialise the shared catalogue as Parquet (identical in every silo)."""
    n = interactions.num_items
    category = interactions.item_category
    if category is None:
        category = np.full(n, -1, dtype=np.int64)
    return _parquet_bytes(
        {
            "item_idx": pa.array(np.arange(n, dtype=np.int64)),
            "item_id": pa.array(interactions.item_ids.astype(str), pa.string()),
            "popularity": pa.array(np.asarray(popularity, dtype=np.float64)),
            "category": pa.array(np.asarray(category, dtype=np.int64)),
        }
    )


def _write_silo(
    silo_dir: Path,
    split: UserSplit,
    interactions: Interactions,
    items: bytes,
    manifest: dict[str, Any],
) -> PreparedSilo:
    """Write one silo's files, each atomically, and its manifest last."""
    n_users = split.num_users
    has_heldout = split.val_item != NO_ITEM
    negatives = io.BytesIO()
    np.savez_compressed(negatives, val=split.val_negatives, test=split.test_negatives)
    contents = {
        TRAIN: _parquet_bytes(
            {
                "user_idx": pa.array(split.train_user),
                "item_idx": pa.array(split.train_item),
            }
        ),
        USERS: _parquet_bytes(
            {
                "user_idx": pa.array(np.arange(n_users, dtype=np.int64)),
                "user_global_idx": pa.array(split.user_global_idx),
                "user_id": pa.array(
                    interactions.user_ids[split.user_global_idx].astype(str),
                    pa.string(),
                ),
                "val_item": pa.array(split.val_item),
                "test_item": pa.array(split.test_item),
            }
        ),
        NEGATIVES: negatives.getvalue(),
        ITEMS: items,
    }
    silo_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in DATA_FILES:
        data = contents[name]
        atomic_write_bytes(silo_dir / name, data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = {
        **manifest,
        "counts": {
            "users": n_users,
            "train-interactions": split.num_train,
            "val-items": int(has_heldout.sum()),
            "test-items": int((split.test_item != NO_ITEM).sum()),
            "items": split.num_items,
        },
        "files": files,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(silo_dir / MANIFEST, text.encode())
    return PreparedSilo(
        silo_id=int(manifest["silo-id"]),
        name=manifest["silo-name"],
        path=silo_dir,
        num_users=n_users,
        num_train=split.num_train,
        num_heldout=int(has_heldout.sum()),
        files=(*DATA_FILES, MANIFEST),
    )


def _parquet_bytes(columns: Mapping[str, pa.Array]) -> bytes:
    """Serialise columns as one Parquet file, in memory."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(dict(columns)), sink)
    return bytes(sink.getvalue().to_pybytes())
