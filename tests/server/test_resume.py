"""Durable silo state and server resume (in-process; the deployment tests do it with processes)."""

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict

from client import durable
from client.app import app as client_app
from common import records
from common.errors import ConfigError
from common.privacy.audit import audit_run
from common.rundir import RunDir
from common.storage import load_arrays
from server.federation import run_federation
from server.recorder import RunRecorder
from tests.fakes import LocalGrid, ServerKilled, kill_server_after, local_dp_run_config

NODES = 3


def _config(run_dir: Path, rounds: int = 4, **extra) -> dict:
    return local_dp_run_config(run_dir, rounds, **extra)


def _mechanism_events(run_dir: Path, pid: int) -> list[tuple]:
    lines = (run_dir / "ledger" / f"silo-{pid}.jsonl").read_text().splitlines()
    keep = ("kind", "round", "noise-multiplier", "sample-rate", "steps", "epsilon", "delta")
    return [tuple(json.loads(x).get(k) for k in keep) for x in lines]


def test_resumed_run_has_the_ledger_of_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    run_federation(LocalGrid(client_app, _config(straight), NODES), _config(straight))

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as m:
        kill_server_after(m, 2)
        with pytest.raises(ServerKilled):
            run_federation(LocalGrid(client_app, _config(resumed), NODES), _config(resumed))
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == 2
    # A fresh server and fresh nodes (their node state is gone); silos restore from disk.
    cfg = _config(resumed, resume=True)
    run_federation(LocalGrid(client_app, cfg, NODES), cfg)

    rounds = RunDir(resumed).read_rounds()
    assert [r.server_round for r in rounds] == [1, 2, 3, 4]
    for pid in range(NODES):
        events = _mechanism_events(resumed, pid)
        assert events == _mechanism_events(straight, pid)
        assert [e[1] for e in events] == [1, 2, 3, 4]  # no round counted twice
    assert not audit_run(resumed, empirical=False).problems


def test_a_resent_round_after_a_server_crash_does_not_spend_budget_twice(tmp_path, monkeypatch):
    # The server dies after the silos trained round 3 but before it completed the round.
    run = tmp_path / "run"
    cfg = _config(run)
    original = RunRecorder.record_round

    def record_round(self, record, arrays):
        if record.server_round == 3:
            raise ServerKilled
        original(self, record, arrays)

    with monkeypatch.context() as m:
        m.setattr(RunRecorder, "record_round", record_round)
        with pytest.raises(ServerKilled):
            run_federation(LocalGrid(client_app, cfg, NODES), cfg)
    trained_3 = [e for e in _mechanism_events(run, 0) if e[1] == 3]
    assert len(trained_3) == 1  # silo 0 trained round 3 and its ledger line reached the server
    resumed = _config(run, resume=True)
    run_federation(LocalGrid(client_app, resumed, NODES), resumed)
    for pid in range(NODES):
        assert [e[1] for e in _mechanism_events(run, pid)] == [1, 2, 3, 4]
    assert not audit_run(run, empirical=False).problems


@pytest.mark.parametrize("how", ["reply-lost", "stopped-before-progress"])
def test_a_round_the_silo_trained_but_the_server_never_committed_is_resent_once(tmp_path, monkeypatch, how):
    # Silo 0 trains round 3 and saves its reply; its reply never reaches the server
    # ("reply-lost": the server dies as it comes in), or silo 0 is stopped after its ledger
    # line but before progress.json ("stopped-before-progress": a killed SuperNode, or
    # Flower's SIGINT to a task whose run stopped). The server dies before committing round 3.
    run = tmp_path / "run"
    cfg = _config(run, rounds=3)
    original = durable.atomic_write_json

    def atomic_write_json(path, data):
        if how == "stopped-before-progress" and path.name == durable.PROGRESS and data["last-round"] == 3:
            if "silo-0" in str(path):
                raise KeyboardInterrupt  # what Flower's heartbeat raises in a task whose run stopped
        original(path, data)

    def on_reply(reply):
        if how == "reply-lost" and reply.metadata.message_type.startswith("train"):
            ledger = reply.content.config_records[records.LEDGER]
            lines = [json.loads(str(x)) for x in ledger[records.LEDGER_LINES]]  # type: ignore[union-attr]
            if ledger[records.LEDGER_PARTITION] == 0 and any(line["round"] == 3 for line in lines):
                raise ServerKilled

    def record_round(self, record, arrays):
        if record.server_round == 3:
            raise ServerKilled
        original_record(self, record, arrays)

    original_record = RunRecorder.record_round
    with monkeypatch.context() as m:
        m.setattr(durable, "atomic_write_json", atomic_write_json)
        m.setattr(RunRecorder, "record_round", record_round)
        with pytest.raises((ServerKilled, KeyboardInterrupt)):
            run_federation(LocalGrid(client_app, cfg, NODES, on_reply=on_reply), cfg)
    assert [e[1] for e in _mechanism_events(run, 0)] == [1, 2]  # the server never got silo 0's round 3
    (store,) = (run / "silos" / "silo-0").iterdir()
    trained = [json.loads(x)["round"] for x in (store / durable.LEDGER).read_text().splitlines()]
    assert trained == [1, 2, 3]  # but silo 0 trained it and its ledger counts it
    resumed = _config(run, rounds=3, resume=True)
    run_federation(LocalGrid(client_app, resumed, NODES), resumed)
    rounds = RunDir(run).read_rounds()
    assert [r.server_round for r in rounds] == [1, 2, 3]
    assert {e.partition_id for e in rounds[2].privacy} == set(range(NODES))
    assert not [why for _, why in rounds[2].rejected if "ledger" in why or "failed" in why]
    for pid in range(NODES):
        assert [e[1] for e in _mechanism_events(run, pid)] == [1, 2, 3]  # round 3 counted once
    trained = [json.loads(x)["round"] for x in (store / durable.LEDGER).read_text().splitlines()]
    assert trained == [1, 2, 3]  # and never trained twice
    eps = [next(e.epsilon for e in r.privacy if e.partition_id == 0) for r in rounds]
    others = [next(e.epsilon for e in r.privacy if e.partition_id == 1) for r in rounds]
    assert eps == pytest.approx(others)  # the ε of a silo that was never interrupted
    assert not audit_run(run, empirical=False).problems


def test_restarted_silo_keeps_its_user_embeddings_and_its_epsilon(tmp_path):
    cfg = _config(tmp_path / "run", rounds=3)
    grid = LocalGrid(client_app, cfg, NODES)
    seen: dict[int, np.ndarray] = {}
    original = grid.push_messages

    def push_messages(messages):
        messages = list(messages)
        if messages and messages[0].metadata.message_type.startswith("train"):
            rnd = int(messages[0].content.config_records[records.CONFIG][records.SERVER_ROUND])
            if rnd == 2:  # silo 1's SuperNode "restarts" between rounds: its node state is lost
                state = grid.contexts[2].state
                seen["before"] = state.array_records[records.STATE_USER_PARAMS]["user_embedding.weight"].numpy().copy()
                (store,) = (tmp_path / "run" / "silos" / "silo-1").iterdir()
                seen["disk"] = load_arrays(store / "user-params.npz")["user_embedding.weight"].numpy()
                grid.contexts[2].state = RecordDict()
        message_ids = original(messages)
        if "before" in seen and "after" not in seen:
            seen["restored_ledger"] = len(grid.contexts[2].state.config_records[records.STATE_LEDGER][records.LEDGER_LINES])
            seen["after"] = True
        return message_ids

    grid.push_messages = push_messages
    run_federation(grid, cfg)
    rounds = RunDir(tmp_path / "run").read_rounds()
    eps = [next(e.epsilon for e in r.privacy if e.partition_id == 1) for r in rounds]
    assert eps[0] < eps[1] < eps[2]  # grows from where it was, not from zero
    others = [next(e.epsilon for e in r.privacy if e.partition_id == 0) for r in rounds]
    assert eps == pytest.approx(others)  # same mechanism: same ε as a silo that never restarted
    assert seen["restored_ledger"] == 2  # round 1 from disk + round 2
    # What the restarted silo restored is exactly the rows it had, not a fresh initialisation.
    np.testing.assert_array_equal(seen["disk"], seen["before"])
    init = _initial_user_rows(cfg, partition_id=1)
    assert not np.allclose(seen["before"], init)
    assert not audit_run(tmp_path / "run", empirical=False).problems


def test_resume_refuses_changed_settings_and_missing_runs(tmp_path):
    run = tmp_path / "run"
    cfg = _config(run, rounds=1)
    run_federation(LocalGrid(client_app, cfg, NODES), cfg)
    changed = _config(run, rounds=2, resume=True, **{"privacy.local.noise-multiplier": 0.5})
    with pytest.raises(ConfigError, match="privacy.local.noise-multiplier: 1.2 -> 0.5"):
        run_federation(LocalGrid(client_app, changed, NODES), changed)
    missing = _config(tmp_path / "nothing", resume=True)
    with pytest.raises(ConfigError, match="holds no fedrec run"):
        run_federation(LocalGrid(client_app, missing, NODES), missing)


def _initial_user_rows(cfg: dict, partition_id: int) -> np.ndarray:
    from client import silo
    from common.config import AppConfig
    from common.data.pipeline import silo_data

    app_cfg = AppConfig.from_run_config(cfg)
    data = silo_data(app_cfg.data, app_cfg.seed, partition_id, NODES)
    return silo.new_model(app_cfg, data, partition_id).user_embedding.weight.detach().numpy()
