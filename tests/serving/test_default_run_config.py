"""ServerApp and ClientApp given an empty or partial run config run with pyproject.toml's defaults."""

import pytest
from flwr.app import Context, RecordDict

from client.app import app as client_app
from common.errors import ConfigError
from common.run_config import load_default_run_config, with_defaults
from common.rundir import RunDir
from server.app import main as server_main
from simulations.inprocess import InProcessGrid


def test_with_defaults_fills_missing_keys_and_still_refuses_unknown_ones():
    assert with_defaults({}) == load_default_run_config()
    assert with_defaults({"model.dim": 4})["model.dim"] == 4
    assert with_defaults({"model.dim": 4})["num-server-rounds"] == load_default_run_config()["num-server-rounds"]
    with pytest.raises(ConfigError, match="unknown config key 'model.dimension'"):
        with_defaults({"model.dimension": 4})


def test_server_and_client_apps_run_a_partial_run_config_with_the_defaults(tmp_path):
    # Only four keys: every other one (num-server-rounds among them) comes from pyproject.toml.
    partial = {"run-dir": str(tmp_path / "run"), "data.synthetic.num-users": 200,
               "data.synthetic.num-items": 200, "num-server-rounds": 1}
    grid = InProcessGrid(client_app, partial, 2)  # the ClientApps' contexts get the partial config too
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(partial)))
    rd = RunDir(tmp_path / "run")
    assert [r.server_round for r in rd.read_rounds()] == [1]
    assert rd.read_rounds()[0].evaluate["silos"] == 2  # both ClientApps answered
    saved = rd.read_config().run_config
    assert saved == {**load_default_run_config(), **partial}  # the defaults are recorded, not left implicit


def test_an_empty_run_config_reaches_the_defaults_not_a_missing_setting_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_run_federation(grid, run_config):
        seen.update(run_config)

    monkeypatch.setattr("server.app.run_federation", fake_run_federation)
    server_main(object(), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    assert seen == load_default_run_config()
