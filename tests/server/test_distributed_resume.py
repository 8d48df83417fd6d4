"""A distributed-DP run resumes after a server crash: same ε, no second histogram, N_total checked."""

import json

import numpy as np
import pytest

from client.app import app as client_app
from common.errors import ConfigError
from common.privacy import distributed as dd
from common.privacy.audit import audit_run
from server.distributed import STATE_FILE
from server.federation import run_federation
from tests.fakes import LocalGrid, ServerKilled, kill_server_after
from tests.server.test_distributed_round import SILOS, distributed_config, server_ledger


def _crashed_after_round_1(run_dir, **extra) -> None:
    """A distributed run whose server dies right after recording round 1."""
    cfg = distributed_config(run_dir, **extra)
    with pytest.MonkeyPatch.context() as m:
        kill_server_after(m, 1)
        with pytest.raises(ServerKilled):
            run_federation(LocalGrid(client_app, cfg, SILOS), cfg)


def _releases(run_dir):
    return [e for e in server_ledger(run_dir) if e["kind"].startswith("distributed")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    cfg = distributed_config(run_dir, **{"num-server-rounds": 3, "privacy.distributed.server-momentum": 0.5})
    run_federation(LocalGrid(client_app, cfg, SILOS), cfg)
    return run_dir


def test_a_resumed_distributed_run_spends_what_an_uninterrupted_one_does(tmp_path, straight):
    run_dir = tmp_path / "run"
    extra = {"num-server-rounds": 3, "privacy.distributed.server-momentum": 0.5}
    _crashed_after_round_1(run_dir, **extra)
    saved = np.load(run_dir / STATE_FILE)
    assert int(saved["population"]) == 150 and int(saved["silos"]) == SILOS and saved["velocity"].size > 0
    # a fresh server and fresh nodes; the silos restore from their state directories
    resumed = distributed_config(run_dir, **extra, resume=True)
    run_federation(LocalGrid(client_app, resumed, SILOS), resumed)

    got, want = _releases(run_dir), _releases(straight)
    assert [(e["kind"], e["round"]) for e in got] == [(e["kind"], e["round"]) for e in want]
    assert [e["kind"] for e in got].count(dd.KIND_HISTOGRAM) == 1  # no second histogram
    assert [e["epsilon"] for e in got] == pytest.approx([e["epsilon"] for e in want])
    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    assert not audit_run(run_dir, empirical=False).problems
    for path in sorted((run_dir / "state").glob("silo-*/*/ledger.jsonl")):  # each silo's view continued
        own = [json.loads(x) for x in path.read_text().splitlines()]
        assert [(e["kind"], e["round"]) for e in own] == [(e["kind"], e["round"]) for e in want]


def test_resume_refuses_a_changed_union_population(tmp_path):
    run_dir = tmp_path / "run"
    _crashed_after_round_1(run_dir, **{"num-server-rounds": 2})
    resumed = distributed_config(run_dir, **{"num-server-rounds": 2}, resume=True)
    one_lost = LocalGrid(client_app, resumed, SILOS, drop=lambda node, msg: node == SILOS)  # a silo is gone
    with pytest.raises(ConfigError, match=r"N_total = \d+ users in 2 silos; the run's σ was calibrated for 150 users in 3"):
        run_federation(one_lost, resumed)
    assert [e["round"] for e in _releases(run_dir) if e["kind"] == dd.KIND_TRAINING] == [1]  # nothing more spent


def test_resume_without_the_state_file_names_it(tmp_path):
    run_dir = tmp_path / "run"
    _crashed_after_round_1(run_dir, **{"num-server-rounds": 2})
    (run_dir / STATE_FILE).unlink()
    resumed = distributed_config(run_dir, **{"num-server-rounds": 2}, resume=True)
    with pytest.raises(ConfigError, match=STATE_FILE.replace(".", r"\.") + " is missing"):
        run_federation(LocalGrid(client_app, resumed, SILOS), resumed)


def test_a_crash_after_a_step_but_before_its_checkpoint_resumes_with_the_checkpoints_optimiser_state(tmp_path):
    from server.distributed import DistributedDP
    from tests.fakes import kill_server_before_recording

    # Arrange: momentum on; the server dies after round 2's step, before round 2 is recorded
    run_dir = tmp_path / "run"
    extra = {"num-server-rounds": 3, "privacy.distributed.server-momentum": 0.5}
    cfg = distributed_config(run_dir, **extra)
    with pytest.MonkeyPatch.context() as m:
        kill_server_before_recording(m, 2)
        with pytest.raises(ServerKilled):
            run_federation(LocalGrid(client_app, cfg, SILOS), cfg)
    saved = dict(np.load(run_dir / STATE_FILE))
    assert int(saved["round"]) == 2 and int(saved["previous-round"]) == 1  # round 2 stepped, checkpoint 1 is the last
    assert not np.array_equal(saved["velocity"], saved["previous-velocity"])
    restored = []
    original = DistributedDP._restore

    def spy(self, arrays, checkpoint_round):
        out = original(self, arrays, checkpoint_round)
        restored.append((checkpoint_round, self._velocity))
        return out

    # Act: resume from round 1's checkpoint
    resumed = distributed_config(run_dir, **extra, resume=True)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(DistributedDP, "_restore", spy)
        run_federation(LocalGrid(client_app, resumed, SILOS), resumed)
    # Assert: the velocity after round 1's step, not round 2's; the run completes
    ((checkpoint_round, velocity),) = restored
    assert checkpoint_round == 1 and np.array_equal(velocity, saved["previous-velocity"])
    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    # round 2's first release (accounted before its unmask, then the crash) stays counted
    assert [e["round"] for e in _releases(run_dir) if e["kind"] == dd.KIND_TRAINING] == [1, 2, 2, 3]
    assert not audit_run(run_dir, empirical=False).problems


def test_resume_refuses_an_optimiser_state_newer_than_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    _crashed_after_round_1(run_dir, **{"num-server-rounds": 2})
    saved = dict(np.load(run_dir / STATE_FILE))
    np.savez(run_dir / STATE_FILE, **{**saved, "round": np.array(5), "previous-round": np.array(4)})
    resumed = distributed_config(run_dir, **{"num-server-rounds": 2}, resume=True)
    with pytest.raises(ConfigError, match=r"after rounds \[4, 5\], none at or before the checkpoint of round 1"):
        run_federation(LocalGrid(client_app, resumed, SILOS), resumed)
