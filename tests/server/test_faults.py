"""A failing or silent silo does not stop a round; the run records who was missing and why."""

import json

from client.app import app as client_app
from server.federation import run_federation
from tests.fakes import LocalGrid


def _rounds(cfg) -> list[dict]:
    return [json.loads(x) for x in (open(f"{cfg['run-dir']}/metrics.jsonl").read().splitlines())]


def test_a_silo_with_a_bad_data_path_fails_with_the_path_and_the_round_goes_on(small_run_config, tmp_path):
    bad = tmp_path / "no-such-silo"
    grid = LocalGrid(client_app, small_run_config, 3)
    grid.contexts[2].node_config["data-path"] = str(bad)
    small_run_config.update({"data.dataset": "ml-100k", "data.path": str(tmp_path)})  # only silo 1 reads it
    grid.contexts[2].run_config = dict(small_run_config)
    cfg = {**small_run_config, "data.dataset": "synthetic", "data.path": ""}
    for node in (1, 3):
        grid.contexts[node].run_config = dict(cfg)
    run_federation(grid, cfg)
    rounds = _rounds(cfg)
    assert len(rounds) == cfg["num-server-rounds"]
    for r in rounds:
        assert r["train"]["silos"] == 2
        train, evaluation = r["rejected"]  # the failing silo's training and evaluation replies
        assert train["node"] == evaluation["node"] == 2
        assert str(bad) in train["reason"] and evaluation["reason"].startswith("evaluation: silo failed")
    report = open(f"{cfg['run-dir']}/report.md").read()
    assert str(bad) in report


def test_a_silent_silo_is_listed_as_missing_and_the_others_are_aggregated(small_run_config):
    grid = LocalGrid(client_app, small_run_config, 3, drop=lambda node, msg: node == 3 and msg.metadata.message_type.startswith("train"))
    run_federation(grid, small_run_config)
    rounds = _rounds(small_run_config)
    assert all(r["missing-nodes"] == [3] and r["train"]["silos"] == 2 for r in rounds)
