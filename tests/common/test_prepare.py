"""Tests of `fedrec data prepare`: the per-silo directories it writes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.main import app
from common.data.pipeline import silo_data
from common.data.prepare import prepare_silos
from common.data.prepared import DATA_FILES, MANIFEST, load_prepared_silo
from common.data.split import NO_ITEM
from common.errors import ConfigError, DataError
from common.run_config import load_default_run_config
from tests.common.prepared_inputs import (
    NEGATIVES,
    SEED,
    assert_same_data,
    csv_settings,
    prepare_csv,
)

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


# By N silos: equal to simulation


@pytest.mark.parametrize("skew", ["iid", "dirichlet"])
def test_prepared_silos_equal_simulation(log_csv: Path, tmp_path: Path, skew: str):
    # Arrange
    out = tmp_path / "out"
    prepare_csv(log_csv, out, num_silos=4, skew=skew, dirichlet_alpha=0.3)
    data = csv_settings(log_csv, skew=skew, **{"dirichlet-alpha": 0.3})
    # Act / Assert
    for k in range(4):
        assert_same_data(load_prepared_silo(out / f"silo-{k}"), silo_data(data, SEED, k, 4))


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
    pooled = silo_data(csv_settings(log_csv), SEED, 0, 1)
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
        prepare_csv(log_csv, tmp_path / "out", silo_column="site")


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
        prepare_csv(log_csv, tmp_path / "out", **kw)


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
        prepare_csv(log_csv, tmp_path / "out", num_silos=10_000)


def test_non_empty_output_directory_is_refused(log_csv: Path, tmp_path: Path):
    # Arrange
    (tmp_path / "notes.txt").write_text("mine")
    # Act / Assert
    with pytest.raises(ConfigError, match=r"is not empty.*--force"):
        prepare_csv(log_csv, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_force_replaces_an_earlier_prepare(log_csv: Path, tmp_path: Path):
    # Arrange
    prepare_csv(log_csv, tmp_path, num_silos=5)
    (tmp_path / "notes.txt").write_text("mine")
    # Act
    prepare_csv(log_csv, tmp_path, num_silos=2, force=True)
    # Assert
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt",
        "silo-0",
        "silo-1",
    ]


def test_force_keeps_files_it_did_not_write(log_csv: Path, tmp_path: Path):
    # Arrange
    prepare_csv(log_csv, tmp_path, num_silos=2)
    (tmp_path / "silo-1" / "keys.pem").write_text("secret")
    # Act / Assert
    with pytest.raises(ConfigError, match=r"refusing to delete .*silo-1.*keys\.pem"):
        prepare_csv(log_csv, tmp_path, num_silos=2, force=True)
    assert (tmp_path / "silo-1" / "keys.pem").exists()


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
