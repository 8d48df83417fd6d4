"""Tests of the prepared-silo reader: loading, validation and the catalogue size."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from common.config import AppConfig
from common.data.pipeline import silo_data
from common.data.prepared import (
    DATA_FILES,
    MANIFEST,
    catalogue_size,
    load_prepared_silo,
)
from common.errors import DataError, DataWarning
from common.run_config import load_default_run_config
from tests.common.prepared_inputs import SEED, assert_same_data, csv_settings


@pytest.fixture
def silo_copy(prepared: Path, tmp_path: Path) -> Path:
    """A private copy of silo 0 that a test may damage."""
    copy = tmp_path / "silo-0"
    copy.mkdir()
    for f in (prepared / "silo-0").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    return copy


def _replace(silo_dir: Path, name: str, data: bytes) -> None:
    """Rewrite a data file and its manifest entry, so only the content check fails."""
    (silo_dir / name).write_bytes(data)
    manifest = json.loads((silo_dir / MANIFEST).read_text())
    manifest["files"][name] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    (silo_dir / MANIFEST).write_text(json.dumps(manifest))


def _edit_manifest(silo_dir: Path, **changes: object) -> None:
    manifest = json.loads((silo_dir / MANIFEST).read_text())
    manifest.update(changes)
    (silo_dir / MANIFEST).write_text(json.dumps(manifest))


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


# Loading through the client's entry point


def test_silo_data_loads_a_prepared_directory(log_csv: Path, prepared: Path):
    # Arrange: the run config names another data set; the prepared files win
    other = AppConfig.from_run_config(load_default_run_config()).data
    # Act
    with pytest.warns(DataWarning, match="prepared with eval-negatives 20"):
        data = silo_data(other, SEED, 3, 4, path=str(prepared / "silo-3"))
    # Assert
    assert_same_data(data, silo_data(csv_settings(log_csv), SEED, 3, 4))

# Loading: every problem is a DataError naming the file


@pytest.mark.parametrize("name", [*DATA_FILES, MANIFEST])
def test_missing_file_is_named(silo_copy: Path, name: str):
    # Arrange
    (silo_copy / name).unlink()
    # Act / Assert
    with pytest.raises(DataError, match=re.escape(f"{silo_copy / name}: missing")):
        load_prepared_silo(silo_copy)


@pytest.mark.parametrize("name", DATA_FILES)
def test_corrupted_file_is_named(silo_copy: Path, name: str):
    # Arrange: flip one byte in the middle
    data = bytearray((silo_copy / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (silo_copy / name).write_bytes(bytes(data))
    # Act / Assert
    with pytest.raises(DataError, match=re.escape(f"{silo_copy / name}: contents")):
        load_prepared_silo(silo_copy)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format-version": 2}, "format-version 2 is not supported"),
        ({"format-version": True}, "format-version True is not supported"),
        ({"format": "other"}, "format is 'other'"),
        ({"silo-id": 4}, r"silo-id must be an integer in \[0, 3\]"),
        ({"eval-negatives": "20"}, "eval-negatives must be an integer"),
        ({"files": {}}, "files lists"),
    ],
)
def test_bad_manifest_is_named(silo_copy: Path, changes: dict, match: str):
    # Arrange
    _edit_manifest(silo_copy, **changes)
    # Act / Assert
    with pytest.raises(
        DataError, match=re.escape(str(silo_copy / MANIFEST)) + ".*" + match
    ):
        load_prepared_silo(silo_copy)


def test_manifest_that_is_not_json_is_named(silo_copy: Path):
    (silo_copy / MANIFEST).write_text("{not json")
    with pytest.raises(
        DataError, match=re.escape(f"{silo_copy / MANIFEST}: not valid JSON")
    ):
        load_prepared_silo(silo_copy)


def test_counts_not_matching_the_manifest_are_named(silo_copy: Path):
    # Arrange
    manifest = json.loads((silo_copy / MANIFEST).read_text())
    manifest["counts"]["users"] += 1
    (silo_copy / MANIFEST).write_text(json.dumps(manifest))
    # Act / Assert
    with pytest.raises(
        DataError, match=re.escape(f"{silo_copy / 'users.parquet'}: has")
    ):
        load_prepared_silo(silo_copy)


def test_item_out_of_catalogue_range_is_named(silo_copy: Path):
    # Arrange
    table = pq.read_table(silo_copy / "train.parquet")
    items = table.column("item_idx").to_numpy().copy()
    items[3] = 10_000
    _replace(
        silo_copy,
        "train.parquet",
        _parquet(table.set_column(1, "item_idx", pa.array(items))),
    )
    # Act / Assert
    message = f"{silo_copy / 'train.parquet'}: item_idx value 10000 is out of range"
    with pytest.raises(DataError, match=re.escape(message) + ".*catalogue has"):
        load_prepared_silo(silo_copy)


def test_wrong_dtype_is_named(silo_copy: Path):
    # Arrange
    table = pq.read_table(silo_copy / "users.parquet")
    column = table.schema.get_field_index("val_item")
    table = table.set_column(column, "val_item", pc.cast(table["val_item"], pa.int32()))
    _replace(silo_copy, "users.parquet", _parquet(table))
    # Act / Assert
    message = (
        f"{silo_copy / 'users.parquet'}: column 'val_item' has type int32, "
        "expected int64"
    )
    with pytest.raises(DataError, match=re.escape(message)):
        load_prepared_silo(silo_copy)


def test_wrong_negatives_shape_is_named(silo_copy: Path):
    # Arrange
    with np.load(silo_copy / "negatives.npz") as npz:
        val, test = npz["val"], npz["test"]
    buf = io.BytesIO()
    np.savez(buf, val=val[:, :-1], test=test)
    _replace(silo_copy, "negatives.npz", buf.getvalue())
    # Act / Assert
    with pytest.raises(
        DataError, match=re.escape(f"{silo_copy / 'negatives.npz'}: array 'val'")
    ):
        load_prepared_silo(silo_copy)


def test_pickled_negatives_are_refused(silo_copy: Path):
    buf = io.BytesIO()
    np.savez(buf, val=np.array([object()]), test=np.array([1]))
    _replace(silo_copy, "negatives.npz", buf.getvalue())
    with pytest.raises(
        DataError, match=re.escape(f"{silo_copy / 'negatives.npz'}: cannot read")
    ):
        load_prepared_silo(silo_copy)


# The client hook: partition ids must match


@pytest.mark.parametrize(("partition_id", "num_partitions"), [(1, 4), (0, 5)])
def test_partition_mismatch_is_an_error(
    log_csv: Path, prepared: Path, partition_id: int, num_partitions: int
):
    message = (
        f"holds silo 0 of 4, but the node config says partition-id={partition_id}, "
        f"num-partitions={num_partitions}"
    )
    with pytest.raises(DataError, match=re.escape(message)):
        silo_data(
            csv_settings(log_csv),
            SEED,
            partition_id,
            num_partitions,
            str(prepared / "silo-0"),
        )


def test_prepare_output_root_is_not_a_silo(log_csv: Path, prepared: Path):
    with pytest.raises(DataError, match=re.escape(f"e.g. {prepared / 'silo-2'}")):
        silo_data(csv_settings(log_csv), SEED, 2, 4, str(prepared))


def test_other_seed_than_prepared_warns(log_csv: Path, prepared: Path):
    with pytest.warns(DataWarning, match="prepared with seed 7 but the run has 8"):
        silo_data(csv_settings(log_csv), SEED + 1, 0, 4, str(prepared / "silo-0"))



# Catalogue size (the server's only read)


def test_catalogue_size_of_a_silo_and_of_a_prepare_root(prepared: Path):
    # Arrange
    items = load_prepared_silo(prepared / "silo-1").split.num_items
    # Act / Assert
    assert catalogue_size(prepared / "silo-1") == items
    assert catalogue_size(prepared) == items


def test_catalogue_size_is_none_for_other_paths(log_csv: Path, tmp_path: Path):
    assert catalogue_size(tmp_path) is None  # an empty directory
    assert catalogue_size(tmp_path / "nowhere") is None
    assert catalogue_size(log_csv) is None  # a file, not a directory


def test_unreadable_manifest_names_the_file(silo_copy: Path):
    # Arrange
    (silo_copy / MANIFEST).write_text("{not json")
    # Act / Assert
    message = f"{silo_copy / MANIFEST}: cannot read the catalogue size"
    with pytest.raises(DataError, match=re.escape(message)):
        catalogue_size(silo_copy)
