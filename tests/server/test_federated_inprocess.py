"""The real ServerApp round loop and ClientApp handlers, in-process over LocalGrid."""

import json
from pathlib import Path

from flwr.app import Message

from common import records
from common.models import is_private
from common.storage import load_arrays
from simulations.inprocess import run_inprocess
from tests.fakes import run_local


def test_rounds_improve_hit_rate_and_write_run_dir(small_run_config):
    # Arrange
    small_run_config["num-server-rounds"] = 4
    # Act
    run_inprocess(small_run_config, num_nodes=3)
    # Assert
    run_dir = Path(small_run_config["run-dir"])
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    hr = [r["evaluate"]["test-hr@10"] for r in rounds]
    assert hr[-1] > 0.25  # random ranking among 100 items gives 0.10
    assert hr[-1] > hr[0]
    assert rounds[-1]["evaluate"]["silos"] == 3
    assert all(r["bytes-sent"] > 0 and r["bytes-received"] > 0 for r in rounds)
    for name in ("config.json", "report.md", "metrics.png", "final.npz", "state.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "round-0004.npz").is_file()
    assert not any(is_private(name) for name in load_arrays(run_dir / "final.npz"))


def test_outgoing_messages_carry_only_shared_parameters_and_metrics(small_run_config):
    # Arrange
    small_run_config["num-server-rounds"] = 2
    replies: list[Message] = []
    # Act
    grid = run_local(small_run_config, num_nodes=2, on_reply=replies.append)
    # Assert
    shared_names = set(load_arrays(Path(small_run_config["run-dir"]) / "final.npz"))
    assert replies, "no replies were captured"
    private_rows = {
        node: ctx.state.array_records[records.STATE_USER_PARAMS] for node, ctx in grid.contexts.items()
    }
    for reply in replies:
        content = reply.content
        assert set(content.config_records) == set()
        assert set(content.array_records) <= {records.ARRAYS}
        assert set(content.metric_records) == {records.METRICS}
        for arrays in content.array_records.values():
            assert set(arrays) == shared_names
            assert not any(is_private(n) for n in arrays)
        # No user's embedding row appears as a row of any array in the reply.
        user_rows = private_rows[reply.metadata.src_node_id]["user_embedding.weight"].numpy()
        for rec in content.array_records.values():
            for arr in rec.values():
                values = arr.numpy()
                if values.ndim == 2 and values.shape[1] == user_rows.shape[1]:
                    matches = (values[:, None, :] == user_rows[None, :, :]).all(-1)
                    assert not matches.any()


def test_silos_report_their_training_cpu_seconds_without_dp(tmp_path):
    """Without DP the round records the slowest silo's wall and CPU seconds of training."""
    from common.run_config import load_default_run_config
    from common.rundir import RunDir
    from simulations.inprocess import run_inprocess

    cfg = load_default_run_config()
    cfg.update({"num-server-rounds": 1, "run-dir": str(tmp_path / "run"), "data.synthetic.num-users": 60,
                "data.synthetic.num-items": 200, "data.synthetic.mean-interactions": 10, "model.dim": 8,
                "eval.full-ranking-k": 20})
    run_inprocess(cfg, num_nodes=2)
    (record,) = RunDir(tmp_path / "run").read_rounds()
    cpu = record.train["train-cpu-seconds"]
    assert 0 < cpu <= record.seconds * 2 + 1  # at most both cores for the round's wall time
    assert "its CPU seconds" in RunDir(tmp_path / "run").report.read_text()
