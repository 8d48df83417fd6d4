"""fedrec recommend on a finished ML-100K simulation: ten raw movie ids with titles, none already rated."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from common.config import AppConfig
from common.data.movielens import load_movielens_100k
from common.data.pipeline import split_interactions
from common.rundir import RunDir
from tests.serving.helpers import finished_run

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _ml100k() -> Path:
    path = Path(os.environ.get("FEDREC_ML100K", REPO.parent / "shared/data/ml-100k"))
    if not (path / "u.data").is_file():
        message = (
            f"MovieLens-100K not found: expected u.data in {path}; set FEDREC_ML100K "
            "to the ml-100k directory, or FEDREC_ALLOW_MISSING_DATA=1 to skip"
        )
        if os.environ.get("FEDREC_ALLOW_MISSING_DATA") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return path


@pytest.mark.slow
def test_recommend_on_a_finished_ml100k_simulation_names_ten_unrated_movies_with_titles(tmp_path):
    data = _ml100k()
    run = tmp_path / "run"
    finished_run(run, silos=5, **{"data.dataset": "ml-100k", "data.path": str(data), "num-server-rounds": 1,
                                  "model.dim": 32})
    result = runner.invoke(app, ["recommend", str(run), "--user", "196", "--json"])
    assert result.exit_code == 0, result.output
    items = json.loads(result.output)["items"]
    log = load_movielens_100k(data)
    cfg = AppConfig.from_run_config(RunDir(run).read_config().run_config)
    split = split_interactions(cfg.data, cfg.seed, log).split
    user = int(np.flatnonzero(log.user_ids == "196")[0])
    trained_on = {str(log.item_ids[i]) for i in split.train_item[split.train_user == user]}
    assert len(trained_on) > 20
    titles = dict(line.split("|")[:2] for line in (data / "u.item").read_text(encoding="latin-1").splitlines())
    ids = [e["item"] for e in items]
    assert len(ids) == 10 == len(set(ids))
    assert not set(ids) & trained_on
    assert all(e["title"] == titles[e["item"]] for e in items)
    printed = runner.invoke(app, ["recommend", str(run), "--user", "196", "-k", "3"])
    assert printed.exit_code == 0 and items[0]["title"] in printed.output
