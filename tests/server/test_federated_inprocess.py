"""The real ServerApp round loop and ClientApp handlers, in-process over LocalGrid."""

import json
from pathlib import Path

from fakes import LocalGrid
from flwr.app import Message

from client.app import app as client_app
from common import records
from common.config import AppConfig
from common.models import is_private
from server.app import initial_shared_arrays
from server.loop import run_rounds
from server.metered_grid import MeteredGrid
from server.reporting import RunRecorder
from server.strategy import SharedModelFedAvg


def run_inprocess(run_config, num_nodes, on_reply=None):
    cfg = AppConfig.from_run_config(run_config)
    grid = LocalGrid(client_app, run_config, num_nodes, on_reply=on_reply)
    recorder = RunRecorder(Path(cfg.run_dir))
    recorder.start(run_config)
    strategy = SharedModelFedAvg(cfg.strategy, cfg.eval.k)
    from common.data.pipeline import load_interactions

    num_items = load_interactions(cfg.data, cfg.seed).num_items
    final = run_rounds(
        strategy,
        MeteredGrid(grid),
        initial_shared_arrays(cfg, num_items),
        first_round=1,
        last_round=cfg.num_server_rounds,
        timeout=cfg.strategy.timeout,
        evaluate_every=cfg.eval.every,
        on_round_end=recorder.record_round,
    )
    recorder.finish(final, cfg.eval.k)
    return cfg, grid, final


def test_rounds_improve_hit_rate_and_write_run_dir(small_run_config):
    # Arrange
    small_run_config["num-server-rounds"] = 4
    # Act
    cfg, grid, final = run_inprocess(small_run_config, num_nodes=3)
    # Assert
    run_dir = Path(cfg.run_dir)
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
    assert not any(is_private(name) for name in final)


def test_outgoing_messages_carry_only_shared_parameters_and_metrics(small_run_config):
    # Arrange
    small_run_config["num-server-rounds"] = 2
    replies: list[Message] = []
    # Act
    _, grid, final = run_inprocess(small_run_config, num_nodes=2, on_reply=replies.append)
    # Assert
    shared_names = set(final)
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
