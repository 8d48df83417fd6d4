"""A silo that lost its privacy state never restarts ε; resume refuses a poisoned checkpoint."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from client.app import app as client_app
from common.errors import ConfigError
from common.privacy.audit import audit_run
from common.rundir import RunDir
from common.storage import load_arrays, save_arrays
from server.federation import run_federation
from server.recorder import RunRecorder
from tests.fakes import LocalGrid, local_dp_run_config

NODES = 3


def _config(run_dir: Path, rounds: int, **extra) -> dict:
    return local_dp_run_config(run_dir, rounds, **extra)


class _ServerKilled(Exception):
    pass


def _run_then_kill_after(run: Path, rounds: int, kill_after: int, monkeypatch) -> None:
    original = RunRecorder.record_round

    def record_round(self, record, arrays):
        original(self, record, arrays)
        if record.server_round == kill_after:
            raise _ServerKilled

    with monkeypatch.context() as m:
        m.setattr(RunRecorder, "record_round", record_round)
        with pytest.raises(_ServerKilled):
            run_federation(LocalGrid(client_app, _config(run, rounds), NODES), _config(run, rounds))


def test_a_silo_whose_state_directory_was_lost_refuses_to_train_instead_of_restarting_epsilon(tmp_path, monkeypatch):
    # Arrange: two rounds charged to every silo, then silo 1's state directory is lost.
    run = tmp_path / "run"
    _run_then_kill_after(run, 4, 2, monkeypatch)
    shutil.rmtree(run / "silos" / "silo-1")
    # Act: resume on fresh nodes (their node state is gone too).
    cfg = _config(run, 4, resume=True)
    run_federation(LocalGrid(client_app, cfg, NODES), cfg)
    # Assert: silo 1 never trained again (its replies are errors naming the lost state), the
    # others did; no ε of silo 1 ever went down; the audit passes on the completed run.
    rounds = RunDir(run).read_rounds()
    assert [r.server_round for r in rounds] == [1, 2, 3, 4]
    for r in rounds[2:]:
        assert {e.partition_id for e in r.privacy} == {0, 2}
        assert any("privacy state was lost" in reason for _, reason in r.rejected)
    eps_1 = [e.epsilon for r in rounds for e in r.privacy if e.partition_id == 1]
    assert len(eps_1) == 2 and eps_1 == sorted(eps_1)
    assert not audit_run(run, empirical=False).problems


def _poison(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "all-nan":
        arrays = load_arrays(path)
        for name in list(arrays):
            arrays[name] = type(arrays[name])(np.full(arrays[name].shape, np.nan, dtype=arrays[name].dtype))
        save_arrays(path, arrays)
    elif how == "wrong-shape":
        arrays = load_arrays(path)
        name = sorted(arrays)[0]
        arrays[name] = type(arrays[name])(np.zeros((2, 2), dtype=np.float32))
        save_arrays(path, arrays)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("truncated", "is unreadable"),
        ("all-nan", "contains NaN or infinite values"),
        ("wrong-shape", "shape/dtype"),
    ],
)
def test_resume_refuses_a_poisoned_checkpoint_naming_the_file(tmp_path, monkeypatch, how, reason):
    # Arrange
    run = tmp_path / "run"
    _run_then_kill_after(run, 3, 2, monkeypatch)
    checkpoint = RunDir(run).checkpoint(2)
    _poison(checkpoint, how)
    metrics_before = RunDir(run).metrics.read_bytes()
    # Act / Assert
    cfg = _config(run, 3, resume=True)
    with pytest.raises(ConfigError, match=reason) as err:
        run_federation(LocalGrid(client_app, cfg, NODES), cfg)
    assert str(checkpoint) in str(err.value)
    assert RunDir(run).metrics.read_bytes() == metrics_before  # nothing already saved was touched
