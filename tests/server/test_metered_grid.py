"""MeteredGrid: traffic counts, and error replies the SuperLink sends for a node name that node."""

import json

from client.app import app as client_app
from common.run_config import load_default_run_config
from server.federation import run_federation
from tests.fakes import UnreachableNodeGrid


def test_a_superlink_error_for_an_unreachable_silo_names_that_silo_not_node_1(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_default_run_config()
    cfg.update({"num-server-rounds": 1, "eval.every": 1, "run-dir": str(run_dir), "data.synthetic.num-users": 120,
                "data.synthetic.num-items": 200, "model.dim": 8})  # fmt: skip
    run_federation(UnreachableNodeGrid(client_app, cfg, 3, unreachable={3}), cfg)
    (line,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    blamed = [r["node"] for r in line["rejected"]]
    assert blamed and set(blamed) == {3}, line["rejected"]  # node 1 is an honest silo here
    assert all("Node Unavailable" in r["reason"] for r in line["rejected"])
    assert line["missing-nodes"] == [3]  # it never answered, so it also counts as missing
    assert line["train"]["silos"] == 2
