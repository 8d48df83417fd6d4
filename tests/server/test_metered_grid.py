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


def test_a_round_no_silo_reached_is_recorded_as_keeping_the_model(tmp_path):
    import numpy as np

    from common.round_record import RoundRecord
    from server.loop import progress_line

    run_dir = tmp_path / "run"
    cfg = load_default_run_config()
    cfg.update({"num-server-rounds": 2, "eval.every": 2, "run-dir": str(run_dir), "data.synthetic.num-users": 120,
                "data.synthetic.num-items": 200, "model.dim": 8})  # fmt: skip
    grid = UnreachableNodeGrid(client_app, cfg, 3, unreachable={1, 2, 3})
    run_federation(grid, cfg)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["train"] for line in lines] == [{"silos": 0, "model-kept": 1}] * 2
    assert all(line["missing-nodes"] == [1, 2, 3] for line in lines)
    assert "model unchanged" in progress_line(RoundRecord.from_json(lines[0]), 2)
    initial, final = np.load(run_dir / "initial.npz"), np.load(run_dir / "final.npz")
    assert final.files == initial.files and all(np.array_equal(final[k], initial[k]) for k in final.files)
