"""Tests of per-silo data directories: `fedrec data prepare` and its loader."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from common.config import AppConfig, DataSettings, load_default_run_config
from common.data.pipeline import SiloData, silo_data
from common.data.prepare import (
    DATA_FILES,
    MANIFEST,
    load_prepared_silo,
    prepare_silos,
)
from common.data.split import NO_ITEM
from common.data.synthetic import SyntheticSpec, generate_synthetic
from common.errors import ConfigError, DataError, DataWarning
from simulations.cli import app

REPO = Path(__file__).resolve().parents[2]
SEED = 7
NEGATIVES = 20
PLATFORMS = ("gamma", "alpha", "beta")  # sorted: alpha=0, beta=1, gamma=2
runner = CliRunner()


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic log as CSV, with a platform per user and two short users."""
    data = generate_synthetic(
        SyntheticSpec(num_users=150, num_items=200, mean_interactions=12, seed=5)
    )
    frame = pd.DataFrame(
        {
            "user_id": data.user_ids[data.user_idx],
            "item_id": data.item_ids[data.item_idx],
            "timestamp": data.timestamp,
            "platform": [PLATFORMS[u % 3] for u in data.user_idx],
        }
    )
    short = pd.DataFrame(  # users with < 3 interactions have no held-out items
        {
            "user_id": ["short-1", "short-2", "short-2"],
            "item_id": list(frame["item_id"][:3]),
            "timestamp": [1, 2, 3],
            "platform": ["beta", "gamma", "gamma"],
        }
    )
    path = tmp_path_factory.mktemp("log") / "log.csv"
    pd.concat([frame, short]).to_csv(path, index=False)
    return path


def _settings(path: Path, **overrides: str | int | float) -> DataSettings:
    run_config = load_default_run_config()
    run_config.update({"data.dataset": "csv", "data.path": str(path)})
    run_config.update({"data.eval-negatives": NEGATIVES})
    run_config.update({f"data.{k}": v for k, v in overrides.items()})
    return AppConfig.from_run_config(run_config).data


def _assert_same(a: SiloData, b: SiloData) -> None:
    for name in (
        "train_user",
        "train_item",
        "val_item",
        "test_item",
        "val_negatives",
        "test_negatives",
        "user_global_idx",
    ):
        x, y = getattr(a.split, name), getattr(b.split, name)
        assert x.dtype == y.dtype == np.int64, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.split.num_items == b.split.num_items
    np.testing.assert_array_equal(a.item_popularity, b.item_popularity)


def _prepare(log: Path, out: Path, **kw: object) -> None:
    args: dict[str, object] = {"seed": SEED, "eval_negatives": NEGATIVES, **kw}
    if "silo_column" not in args:
        args.setdefault("num_silos", 4)
    prepare_silos("csv", log, out, **args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def prepared(log_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    _prepare(log_csv, out)
    return out


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


# By N silos: equal to simulation


@pytest.mark.parametrize("skew", ["iid", "dirichlet"])
def test_prepared_silos_equal_simulation(log_csv: Path, tmp_path: Path, skew: str):
    # Arrange
    out = tmp_path / "out"
    _prepare(log_csv, out, num_silos=4, skew=skew, dirichlet_alpha=0.3)
    data = _settings(log_csv, skew=skew, **{"dirichlet-alpha": 0.3})
    # Act / Assert
    for k in range(4):
        _assert_same(load_prepared_silo(out / f"silo-{k}"), silo_data(data, SEED, k, 4))


def test_prepared_silos_cover_every_interaction_once(log_csv: Path, prepared: Path):
    # Arrange
    rows = len(pd.read_csv(log_csv))
    silos = [load_prepared_silo(prepared / f"silo-{k}") for k in range(4)]
    # Act
    heldout = sum(int((s.split.val_item != NO_ITEM).sum()) * 2 for s in silos)
    users = np.concatenate([s.split.user_global_idx for s in silos])
    # Assert
    assert sum(s.split.num_train for s in silos) + heldout == rows
    np.testing.assert_array_equal(np.sort(users), np.arange(len(users)))
    assert any((s.split.val_item == NO_ITEM).any() for s in silos)  # short users kept


def test_silo_directory_holds_the_documented_files(prepared: Path):
    # Act
    names = sorted(p.name for p in (prepared / "silo-2").iterdir())
    manifest = json.loads((prepared / "silo-2" / MANIFEST).read_text())
    # Assert: no temporary files are left behind
    assert names == sorted([*DATA_FILES, MANIFEST])
    assert manifest["format-version"] == 1
    assert (manifest["silo-id"], manifest["num-silos"], manifest["seed"]) == (
        2,
        4,
        SEED,
    )
    assert manifest["source"]["file"] == "log.csv"
    assert len(manifest["source"]["sha256"]) == 64
    assert manifest["eval-negatives"] == NEGATIVES


def test_plain_pandas_and_numpy_read_a_silo(prepared: Path):
    # Act: exactly as docs/data-format.md shows
    silo = prepared / "silo-1"
    train = pd.read_parquet(silo / "train.parquet")
    users = pd.read_parquet(silo / "users.parquet")
    items = pd.read_parquet(silo / "items.parquet")
    with np.load(silo / "negatives.npz", allow_pickle=False) as npz:
        val_negatives = npz["val"]
    manifest = json.loads((silo / "silo.json").read_text())
    # Assert
    assert len(train) == manifest["counts"]["train-interactions"]
    assert len(users) == manifest["counts"]["users"]
    assert len(items) == manifest["counts"]["items"]
    assert val_negatives.shape == (len(users), NEGATIVES)
    assert str(train["item_idx"].dtype) == "int64"


def test_silo_data_loads_a_prepared_directory(log_csv: Path, prepared: Path):
    # Arrange: the run config names another data set; the prepared files win
    other = AppConfig.from_run_config(load_default_run_config()).data
    # Act
    with pytest.warns(DataWarning, match="prepared with eval-negatives 20"):
        data = silo_data(other, SEED, 3, 4, path=str(prepared / "silo-3"))
    # Assert
    _assert_same(data, silo_data(_settings(log_csv), SEED, 3, 4))


# By a silo column


def test_users_land_where_the_column_says(log_csv: Path, tmp_path: Path):
    # Arrange
    log = pd.read_csv(log_csv, dtype=str)
    # Act
    summary = prepare_silos(
        "csv",
        log_csv,
        tmp_path / "out",
        silo_column="platform",
        seed=SEED,
        eval_negatives=NEGATIVES,
    )
    # Assert
    assert [s.name for s in summary.silos] == ["alpha", "beta", "gamma"]
    total = 0
    for silo in summary.silos:
        users = pd.read_parquet(silo.path / "users.parquet")
        mine = log[log["platform"] == silo.name]
        assert set(users["user_id"]) == set(mine["user_id"])
        data = load_prepared_silo(silo.path)
        heldout = 2 * int((data.split.val_item != NO_ITEM).sum())
        assert data.split.num_train + heldout == len(mine)  # no interaction lost
        total += data.split.num_train + heldout
        manifest = json.loads((silo.path / MANIFEST).read_text())
        assert manifest["silo-name"] == silo.name
        assert manifest["assignment"] == {
            "method": "column",
            "column": "platform",
            "value": silo.name,
        }
    assert total == len(log) == summary.num_interactions


def test_column_split_is_the_global_split(log_csv: Path, tmp_path: Path):
    # Arrange: whatever the assignment, held-out items come from the one global split
    pooled = silo_data(_settings(log_csv), SEED, 0, 1)
    # Act
    prepare_silos(
        "csv",
        log_csv,
        tmp_path,
        silo_column="platform",
        seed=SEED,
        eval_negatives=NEGATIVES,
    )
    data = load_prepared_silo(tmp_path / "silo-0")
    # Assert
    users = data.split.user_global_idx
    np.testing.assert_array_equal(data.split.test_item, pooled.split.test_item[users])
    np.testing.assert_array_equal(
        data.split.test_negatives, pooled.split.test_negatives[users]
    )


def test_integer_silo_values_are_numbered_numerically(tmp_path: Path):
    # Arrange
    log = tmp_path / "log.parquet"
    table = pa.table(
        {
            "user": ["a", "b", "c", "a"],
            "item": ["x", "y", "z", "y"],
            "ts": [1, 2, 3, 4],
            "site": ["10", "9", "10", "10"],
        }
    )
    pq.write_table(table, log)
    # Act
    summary = prepare_silos(
        "parquet",
        log,
        tmp_path / "out",
        silo_column="site",
        seed=0,
        eval_negatives=1,
        user_col="user",
        item_col="item",
        timestamp_col="ts",
    )
    # Assert
    assert [(s.name, s.num_users, s.num_train) for s in summary.silos] == [
        ("9", 1, 1),
        ("10", 2, 3),
    ]


def test_user_in_two_silos_is_an_error(tmp_path: Path):
    # Arrange
    log = tmp_path / "log.csv"
    log.write_text(
        "user_id,item_id,timestamp,platform\n"
        "u1,i1,1,a\nu2,i2,2,b\nu1,i3,3,b\nu1,i4,4,a\n"
    )
    # Act / Assert
    message = (
        "user 'u1' appears under several platform values: 'a' (line 2), 'b' (line 4)"
    )
    with pytest.raises(DataError, match=re.escape(message)):
        prepare_silos(
            "csv",
            log,
            tmp_path / "out",
            silo_column="platform",
            seed=0,
            eval_negatives=1,
        )
    assert not (tmp_path / "out").exists()


def test_missing_silo_column_is_named(log_csv: Path, tmp_path: Path):
    with pytest.raises(DataError, match=r"missing column.*'site'"):
        _prepare(log_csv, tmp_path / "out", silo_column="site")


# Arguments and the output directory


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"num_silos": 2, "silo_column": "platform"}, "exactly one"),
        ({"num_silos": 0}, "num_silos must be an integer >= 1"),
        ({"num_silos": 2, "eval_negatives": 0}, "eval_negatives"),
    ],
)
def test_bad_arguments_are_named(log_csv: Path, tmp_path: Path, kw, match):
    with pytest.raises(ConfigError, match=match):
        _prepare(log_csv, tmp_path / "out", **kw)


def test_silo_column_needs_a_csv_or_parquet_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="silo_column needs a CSV or Parquet"):
        prepare_silos(
            "ml-100k",
            tmp_path,
            tmp_path / "out",
            silo_column="x",
            seed=0,
            eval_negatives=1,
        )


def test_too_many_silos_is_an_error(log_csv: Path, tmp_path: Path):
    with pytest.raises(DataError, match="non-empty silos"):
        _prepare(log_csv, tmp_path / "out", num_silos=10_000)


def test_non_empty_output_directory_is_refused(log_csv: Path, tmp_path: Path):
    # Arrange
    (tmp_path / "notes.txt").write_text("mine")
    # Act / Assert
    with pytest.raises(ConfigError, match=r"is not empty.*--force"):
        _prepare(log_csv, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_force_replaces_an_earlier_prepare(log_csv: Path, tmp_path: Path):
    # Arrange
    _prepare(log_csv, tmp_path, num_silos=5)
    (tmp_path / "notes.txt").write_text("mine")
    # Act
    _prepare(log_csv, tmp_path, num_silos=2, force=True)
    # Assert
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt",
        "silo-0",
        "silo-1",
    ]


def test_force_keeps_files_it_did_not_write(log_csv: Path, tmp_path: Path):
    # Arrange
    _prepare(log_csv, tmp_path, num_silos=2)
    (tmp_path / "silo-1" / "keys.pem").write_text("secret")
    # Act / Assert
    with pytest.raises(ConfigError, match=r"refusing to delete .*silo-1.*keys\.pem"):
        _prepare(log_csv, tmp_path, num_silos=2, force=True)
    assert (tmp_path / "silo-1" / "keys.pem").exists()


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
            _settings(log_csv),
            SEED,
            partition_id,
            num_partitions,
            str(prepared / "silo-0"),
        )


def test_prepare_output_root_is_not_a_silo(log_csv: Path, prepared: Path):
    with pytest.raises(DataError, match=re.escape(f"e.g. {prepared / 'silo-2'}")):
        silo_data(_settings(log_csv), SEED, 2, 4, str(prepared))


def test_other_seed_than_prepared_warns(log_csv: Path, prepared: Path):
    with pytest.warns(DataWarning, match="prepared with seed 7 but the run has 8"):
        silo_data(_settings(log_csv), SEED + 1, 0, 4, str(prepared / "silo-0"))


# CLI


def test_cli_prepare_writes_silos(log_csv: Path, tmp_path: Path):
    # Act
    result = runner.invoke(
        app,
        [
            "data",
            "prepare",
            str(log_csv),
            "--out",
            str(tmp_path / "out"),
            "--silo-column",
            "platform",
            "--seed",
            str(SEED),
            "--eval-negatives",
            "20",
        ],
    )
    # Assert
    assert result.exit_code == 0, result.output
    for k in range(3):
        for name in (*DATA_FILES, MANIFEST):
            assert (tmp_path / "out" / f"silo-{k}" / name).is_file()
    assert "alpha" in result.output
    assert "silo-2/" in result.output


def test_cli_defaults_come_from_the_config(log_csv: Path, tmp_path: Path):
    # Act
    result = runner.invoke(
        app, ["data", "prepare", str(log_csv), "-o", str(tmp_path), "--silos", "2"]
    )
    # Assert
    assert result.exit_code == 0, result.output
    defaults = load_default_run_config()
    manifest = json.loads((tmp_path / "silo-1" / MANIFEST).read_text())
    assert manifest["seed"] == defaults["seed"]
    assert manifest["eval-negatives"] == defaults["data.eval-negatives"]


def test_cli_bad_input_path_is_named(tmp_path: Path):
    # Act
    missing = tmp_path / "nowhere" / "log.csv"
    result = runner.invoke(
        app,
        ["data", "prepare", str(missing), "--out", str(tmp_path / "o"), "--silos", "2"],
    )
    # Assert
    assert result.exit_code != 0
    assert str(missing) in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--silos", "2", "--silo-column", "platform"], "exactly one of --silos"),
        ([], "exactly one of --silos"),
        (["--silos", "2", "--seed", "-1"], "seed"),
        (["--silos", "2", "--dataset", "synthetic"], "cannot be prepared"),
    ],
)
def test_cli_usage_errors_exit_2(log_csv: Path, tmp_path: Path, extra, match):
    result = runner.invoke(
        app, ["data", "prepare", str(log_csv), "-o", str(tmp_path), *extra]
    )
    assert result.exit_code == 2
    assert re.search(match, result.output), result.output


def test_cli_data_error_exits_1(tmp_path: Path):
    # Arrange: line 3 has no timestamp
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,\n")
    # Act
    result = runner.invoke(
        app, ["data", "prepare", str(log), "-o", str(tmp_path / "o"), "--silos", "1"]
    )
    # Assert
    assert result.exit_code == 1
    assert "log.csv" in result.output
    assert "line 3" in result.output


# MovieLens-100K


def test_real_ml100k_in_five_silos(tmp_path: Path):
    # Arrange
    path = Path(os.environ.get("FEDREC_ML100K", REPO.parent / "shared/data/ml-100k"))
    if not (path / "u.data").is_file():
        message = (
            f"MovieLens-100K not found: expected u.data in {path}; set FEDREC_ML100K "
            "to the ml-100k directory, or FEDREC_ALLOW_MISSING_DATA=1 to skip"
        )
        if os.environ.get("FEDREC_ALLOW_MISSING_DATA") == "1":
            pytest.skip(message)
        pytest.fail(message)
    # Act
    summary = prepare_silos(
        "ml-100k", path, tmp_path, num_silos=5, seed=42, eval_negatives=99
    )
    silos = [load_prepared_silo(s.path) for s in summary.silos]
    # Assert
    heldout = sum(2 * int((s.split.val_item != NO_ITEM).sum()) for s in silos)
    assert sum(s.split.num_train for s in silos) + heldout == 100_000
    assert sum(s.split.num_users for s in silos) == 943
    assert {s.split.num_items for s in silos} == {1682}
    assert summary.source.name == "u.data"
