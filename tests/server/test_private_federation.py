"""Local and central DP through the real ServerApp loop and ClientApp, in-process."""

import json
import math
from pathlib import Path

import pytest
from flwr.app import Message
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from common import records
from common.models import is_private
from common.privacy.accounting import Accountant, MechanismUse, epsilon
from common.privacy.events import PrivacyRelease
from common.round_record import RoundRecord
from common.rundir import RunDir
from simulations.inprocess import run_inprocess
from tests.fakes import LocalGrid, run_local


def _rounds(cfg) -> list[RoundRecord]:
    return RunDir(Path(cfg["run-dir"])).read_rounds()


def _reload_state_after_every_reply(grid_holder):
    """Replace each node's state with a serialised copy, as a restarted node would load it."""

    def on_reply(reply: Message) -> None:
        grid = grid_holder["grid"]
        ctx = grid.contexts[reply.metadata.src_node_id]
        ctx.state = recorddict_from_proto(recorddict_to_proto(ctx.state))

    return on_reply


@pytest.fixture
def local_dp_config(small_run_config):
    small_run_config.update(
        {
            "privacy.mode": "local",
            "privacy.local.noise-multiplier": 1.2,
            "privacy.local.target-epsilon": 0.0,  # no budget
            "privacy.local.batch-size": 20,
            "num-server-rounds": 3,
        }
    )
    return small_run_config


def test_epsilon_composes_every_step_of_every_round_across_state_reloads(local_dp_config, monkeypatch):
    # Arrange: every node's state goes through protobuf after each reply.
    holder: dict = {}
    original = LocalGrid.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        holder["grid"] = self

    monkeypatch.setattr(LocalGrid, "__init__", init)
    # Act
    grid = run_local(local_dp_config, num_nodes=3, on_reply=_reload_state_after_every_reply(holder))
    # Assert
    rounds = _rounds(local_dp_config)
    assert len(rounds) == 3
    for ctx in grid.contexts.values():
        acc = Accountant.from_json(dict(ctx.state.config_records[records.STATE_PRIVACY]))
        assert acc.rounds == [1, 2, 3]
        fresh = epsilon([MechanismUse(1.2, acc.sample_rate, acc.steps_per_round * 3)], acc.delta)
        assert acc.epsilon() == pytest.approx(fresh, rel=1e-9)
        reported = [
            next(e for e in r.privacy if e.partition_id == ctx.node_config["partition-id"])
            for r in rounds
        ]
        expected = [
            epsilon([MechanismUse(1.2, acc.sample_rate, acc.steps_per_round * r)], acc.delta)
            for r in (1, 2, 3)
        ]
        assert [e.epsilon for e in reported] == pytest.approx(expected, rel=1e-9)
        assert [e.total_steps for e in reported] == [acc.steps_per_round * r for r in (1, 2, 3)]
        assert reported[-1].unit == "user" and reported[-1].noise_multiplier == 1.2
    report = (Path(local_dp_config["run-dir"]) / "report.md").read_text()
    assert "## Privacy" in report and "Unit of privacy: **user**" in report
    assert (Path(local_dp_config["run-dir"]) / "privacy.png").is_file()


def test_silo_declines_the_round_that_would_exceed_its_budget(local_dp_config):
    # Arrange: a budget between the ε after round 2 and after round 3.
    local_dp_config["num-server-rounds"] = 4
    run_inprocess({**local_dp_config, "num-server-rounds": 1, "run-dir": local_dp_config["run-dir"] + "-probe"}, num_nodes=3)
    probe = _rounds({"run-dir": local_dp_config["run-dir"] + "-probe"})[0].privacy[0]
    use = MechanismUse(1.2, probe.sample_rate, probe.steps)
    eps2, eps3 = (epsilon([use] * r, probe.delta) for r in (2, 3))
    local_dp_config["privacy.local.target-epsilon"] = (eps2 + eps3) / 2
    # Act
    run_inprocess(local_dp_config, num_nodes=3)
    # Assert: every silo trains rounds 1-2, declines round 3, and the run stops there.
    rounds = _rounds(local_dp_config)
    assert [r.server_round for r in rounds] == [1, 2, 3]
    for r in rounds:
        for e in r.privacy:
            assert e.trained == (r.server_round <= 2)
            assert e.epsilon <= local_dp_config["privacy.local.target-epsilon"]
    declined = rounds[-1].privacy
    assert all(e.epsilon_if_trained == pytest.approx(eps3, rel=1e-6) for e in declined)
    report = (Path(local_dp_config["run-dir"]) / "report.md").read_text()
    assert "stopped at round 3" in report
    assert "every silo reached its privacy budget" in report


def test_dp_replies_carry_only_shared_parameters_and_a_privacy_summary(local_dp_config):
    replies: list[Message] = []
    run_local({**local_dp_config, "num-server-rounds": 1}, num_nodes=2, on_reply=replies.append)
    train_replies = [r for r in replies if r.content.array_records]
    assert train_replies
    for reply in train_replies:
        assert set(reply.content.config_records) == {records.PRIVACY, records.LEDGER}
        ledger = reply.content.config_records[records.LEDGER]
        assert {json.loads(line)["kind"] for line in ledger[records.LEDGER_LINES]} == {"dp-sgd"}
        assert not any(is_private(n) for n in reply.content.array_records[records.ARRAYS])
        release = PrivacyRelease.from_json(dict(reply.content.config_records[records.PRIVACY]))
        assert release.trained and math.isfinite(release.epsilon)


def test_central_dp_run_accounts_client_level_epsilon_and_stops_at_its_budget(small_run_config):
    small_run_config.update(
        {
            "privacy.mode": "central",
            "privacy.central.noise-multiplier": 0.8,
            "privacy.central.sample-rate": 0.5,
            "privacy.central.clip": 0.5,
            "privacy.central.delta": 1e-3,
            "num-server-rounds": 6,
        }
    )
    use = MechanismUse(0.8, 0.5, 1)
    eps = [epsilon([use] * r, 1e-3) for r in range(1, 7)]
    small_run_config["privacy.central.target-epsilon"] = (eps[2] + eps[3]) / 2  # room for 3 rounds
    run_inprocess(small_run_config, num_nodes=4)
    rounds = _rounds(small_run_config)
    assert [r.server_round for r in rounds] == [1, 2, 3]
    assert [r.central.epsilon for r in rounds] == pytest.approx(eps[:3], rel=1e-9)
    assert all(r.central.population == 4 for r in rounds)
    report = (Path(small_run_config["run-dir"]) / "report.md").read_text()
    assert "central privacy budget" in report and "Unit of privacy: **one silo**" in report
    assert (Path(small_run_config["run-dir"]) / "final.npz").is_file()


def test_interaction_unit_noises_user_rows_and_counts_interactions(local_dp_config):
    local_dp_config.update({"num-server-rounds": 1, "privacy.local.unit": "interaction", "privacy.local.batch-size": 200})
    grid = run_inprocess(local_dp_config, num_nodes=2)
    summary = _rounds(local_dp_config)[0].privacy
    for ctx in grid.contexts.values():
        acc = Accountant.from_json(dict(ctx.state.config_records[records.STATE_PRIVACY]))
        data_users = ctx.state.array_records[records.STATE_SILO_DATA]["train_user"].numpy()
        assert acc.unit == "interaction" and acc.population == len(data_users)
    assert all(e.unit == "interaction" for e in summary)
    assert "Interaction-level unit" in (Path(local_dp_config["run-dir"]) / "report.md").read_text()


def test_local_and_central_dp_together(local_dp_config):
    local_dp_config.update(
        {
            "privacy.mode": "local+central",
            "privacy.central.noise-multiplier": 1.0,
            "privacy.central.delta": 1e-3,
            "privacy.central.target-epsilon": 0.0,
            "num-server-rounds": 2,
        }
    )
    run_inprocess(local_dp_config, num_nodes=3)
    rounds = _rounds(local_dp_config)
    # Every silo's local release reaches the run; the server's counts stay out of it (central DP).
    assert all(len(r.privacy) == 3 and r.central_counts is None and not r.silos for r in rounds)
    assert rounds[1].central.epsilon > rounds[0].central.epsilon > 0
