"""A silo's local-DP mechanism: δ by the population rule, refused and weak δ, error replies."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from client import privacy
from client.privacy import new_accountant, private_round
from common.config import AppConfig
from common.data.split import UserSplit, leave_one_out
from common.data.synthetic import SyntheticSpec, generate_synthetic
from common.errors import ConfigError
from common.models import build_model
from common.privacy.dpsgd import CsprngNormal, TorchNormal
from common.run_config import load_default_run_config
from common.rundir import RunDir
from common.training import TrainStats
from tests.fakes import run_local


@pytest.fixture(scope="module")
def split() -> UserSplit:
    # 50 users, each with at least 3 interactions: 50 users with train positives.
    spec = SyntheticSpec(num_users=50, num_items=200, mean_interactions=12, seed=4)
    return leave_one_out(generate_synthetic(spec), num_negatives=10, seed=0)


def _cfg(**overrides: float | int | str) -> AppConfig:
    run_config = load_default_run_config()
    run_config.update({"privacy.mode": "local", **overrides})
    return AppConfig.from_run_config(run_config)


def test_default_delta_follows_the_rule_for_the_silos_users(split: UserSplit):
    # Arrange: 50 users -> 1/(10·50) = 2e-3, so δ = min(1e-5, 2e-3) = 1e-5
    users = len(np.unique(split.train_user))
    assert users == 50
    # Act
    acc = new_accountant(_cfg(), split, partition_id=2)
    # Assert
    assert acc.population == 50
    assert acc.delta == pytest.approx(1e-5, rel=1e-12)
    assert acc.delta_rule == "min(1e-5, 1/(10N)) for the silo's N users"
    assert acc.release(1).delta_rule == acc.delta_rule


def test_default_delta_for_interactions_counts_interactions(split: UserSplit):
    # Arrange: N = the silo's training interactions; δ = min(1e-5, 1/(10N)) = 1e-5 here
    # Act
    acc = new_accountant(_cfg(**{"privacy.local.unit": "interaction"}), split, partition_id=0)
    # Assert
    assert acc.population == split.num_train
    assert acc.delta == pytest.approx(min(1e-5, 1 / (10 * split.num_train)), rel=1e-12)
    assert acc.delta_rule == "min(1e-5, 1/(10N)) for the silo's N interactions"


@pytest.mark.parametrize("delta", [0.02, 0.3])  # 1/N = 0.02 for the 50 users
def test_a_delta_of_at_least_1_over_n_is_refused_naming_the_silo(split: UserSplit, delta: float):
    # Act / Assert
    with pytest.raises(ConfigError) as info:
        new_accountant(_cfg(**{"privacy.local.delta": delta}), split, partition_id=3)
    message = str(info.value)
    assert message.startswith(f"silo 3: privacy.local.delta = {delta:g} is not below 1/N = 0.02 for N = 50")


def test_a_delta_above_a_tenth_of_1_over_n_is_accepted_warned_and_recorded(
    split: UserSplit, caplog: pytest.LogCaptureFixture
):
    # Arrange: 1/(10N) = 2e-3 < δ = 5e-3 < 1/N = 0.02
    cfg = _cfg(**{"privacy.local.delta": 5e-3})
    # Act
    with caplog.at_level(logging.WARNING, logger="flwr"):
        acc = new_accountant(cfg, split, partition_id=1)
    # Assert
    assert acc.delta == 5e-3
    assert acc.delta_rule == "configured (above 1/(10N) = 0.002 for the silo's N users: weak)"
    assert acc.release(1).delta_rule == acc.delta_rule
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage().startswith("silo 1: privacy.local.delta = 0.005 is above 1/(10N) = 0.002")


def test_a_small_configured_delta_is_recorded_as_configured(split: UserSplit):
    # Act
    acc = new_accountant(_cfg(**{"privacy.local.delta": 1e-6}), split, partition_id=0)
    # Assert
    assert (acc.delta, acc.delta_rule) == (1e-6, "configured")


def test_a_refused_delta_reaches_the_server_as_each_silos_error_reply(small_run_config):
    # Arrange: about 100 users per silo, so δ = 0.3 is above 1/N for every silo
    small_run_config.update(
        {
            "privacy.mode": "local",
            "privacy.local.delta": 0.3,
            "privacy.local.noise-multiplier": 1.0,
            "privacy.local.target-epsilon": 0.0,
            "num-server-rounds": 1,
        }
    )
    # Act: the run ends normally, with every training reply rejected
    grid = run_local(small_run_config, num_nodes=3)
    # Assert
    (record,) = RunDir(Path(small_run_config["run-dir"])).read_rounds()
    reasons = dict(record.rejected)
    assert len(reasons) == 3 and not record.privacy
    for node, ctx in grid.contexts.items():
        reason = reasons[node]
        assert f"silo {ctx.node_config['partition-id']}: privacy.local.delta = 0.3 is not below 1/N" in reason
        assert "ConfigError" in reason


@pytest.mark.parametrize(("generator", "source"), [("os-seeded", TorchNormal), ("csprng", CsprngNormal)])
def test_the_noise_generator_setting_picks_the_noise_source(
    split: UserSplit, monkeypatch: pytest.MonkeyPatch, generator: str, source: type
):
    # Arrange: record what the silo hands to DP-SGD
    cfg = _cfg(**{"privacy.noise-generator": generator, "privacy.local.target-epsilon": 0.0})
    acc = new_accountant(cfg, split, partition_id=0)
    seen = {}

    def fake_dp_train(model, split, settings, dp, *, steps, rng, noise, device):
        seen["noise"] = noise
        return TrainStats(1, steps, 0.5, 0.0), acc.planned()

    monkeypatch.setattr(privacy, "dp_train", fake_dp_train)
    model = build_model("mf", split.num_users, split.num_items, 4)
    # Act
    result = private_round(model, cfg, split, acc, 1, torch.device("cpu"))
    # Assert
    assert result.trained and isinstance(seen["noise"], source)
    if source is TorchNormal:
        assert seen["noise"].generator is not None


def test_the_noise_generator_defaults_to_os_seeded_and_rejects_other_values():
    # Act / Assert
    assert _cfg().privacy.noise_generator == "os-seeded"
    with pytest.raises(ConfigError, match=r"privacy\.noise-generator"):
        _cfg(**{"privacy.noise-generator": "urandom"})
