"""`fedrec` commands fail fast, with the key/file/line named, before starting Flower."""

import json
from pathlib import Path

from typer.testing import CliRunner

from cli.config import resolve_config
from cli.main import app

runner = CliRunner()


def test_unknown_config_key_is_named_and_nothing_starts(tmp_path: Path):
    # Act
    result = runner.invoke(app, ["simulate", "-c", "train.lrr=0.1", "--run-dir", str(tmp_path / "r")])
    # Assert
    assert result.exit_code == 2
    assert "train.lrr" in result.output
    assert not (tmp_path / "r").exists()


def test_ill_typed_value_is_named(tmp_path: Path):
    result = runner.invoke(app, ["simulate", "-c", "train.local-epochs=1.5", "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "train.local-epochs" in result.output and "integer" in result.output


def test_malformed_data_file_names_file_and_line(tmp_path: Path):
    # Arrange: line 3 has a non-numeric timestamp
    data = tmp_path / "log.csv"
    data.write_text("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,yesterday-ish\n")
    # Act
    result = runner.invoke(app, ["simulate", "--dataset", "csv", "--data-dir", str(data), "--run-dir", str(tmp_path / "r")])
    # Assert
    assert result.exit_code == 2
    assert "log.csv" in result.output and "line 3" in result.output


def test_existing_run_directory_is_not_overwritten(tmp_path: Path):
    # Arrange
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    # Act
    result = runner.invoke(app, ["simulate", "--rounds", "2", "--run-dir", str(run_dir)])
    # Assert
    assert result.exit_code == 2
    assert "already holds a run" in result.output
    assert (run_dir / "metrics.jsonl").read_text() == json.dumps({"round": 1}) + "\n"


def test_too_many_silos_for_the_users_is_rejected(tmp_path: Path):
    result = runner.invoke(app, ["simulate", "--silos", "50", "-c", "data.synthetic.num-users=20", "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "50" in result.output and "silos" in result.output


def test_toml_override_file_and_data_path_made_absolute(tmp_path: Path):
    # Arrange
    overrides = tmp_path / "exp.toml"
    overrides.write_text('[train]\nlr = 0.01\n[data]\ndataset = "csv"\npath = "rel/log.csv"\n')
    # Act
    run_config, cfg = resolve_config([str(overrides)])
    # Assert
    assert cfg.train.lr == 0.01
    assert Path(str(run_config["data.path"])).is_absolute()


def test_centralized_popularity_runs_on_synthetic(tmp_path: Path):
    result = runner.invoke(
        app,
        ["centralized", "--model", "popularity", "-c", "data.synthetic.num-users=200",
         "-c", "data.synthetic.num-items=300", "--run-dir", str(tmp_path / "c")],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert 0.1 < summary["test-hr@10"] <= 1.0
