"""ClientLevelDP: Poisson sampling of silos, clipping of updates, noise, budget stop."""

import dataclasses

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from common.config import AppConfig
from common.run_config import load_default_run_config
from server.central_dp import ClientLevelDP
from server.strategy import SharedModelFedAvg
from tests.fakes import STRATEGY_SETTINGS, FourNodeGrid, train_reply

NAME = "item_embedding.weight"


def _privacy(accountant="pld", **central):
    base = AppConfig.from_run_config(load_default_run_config()).privacy
    return dataclasses.replace(base, accountant=accountant, central=dataclasses.replace(base.central, **central))


def _current():
    return ArrayRecord({NAME: Array(np.zeros((3, 2), dtype=np.float32))})


def test_updates_are_clipped_summed_and_divided_by_the_expected_count():
    settings = _privacy(noise_multiplier=1e-12, clip=1.0, sample_rate=1.0, delta=1e-5, target_epsilon=0.0)
    dp = ClientLevelDP(SharedModelFedAvg(STRATEGY_SETTINGS, k=10), settings, num_rounds=5, rng=np.random.default_rng(0))
    instructions = list(dp.configure_train(1, _current(), ConfigRecord(), FourNodeGrid()))
    assert len(instructions) == 4
    small = np.full((3, 2), 0.1, dtype=np.float32)  # norm 0.245: kept as is
    big = np.full((3, 2), 10.0, dtype=np.float32)  # norm 24.5: scaled to norm 1
    replies = [train_reply(instructions[0], {NAME: small}, 1.0), train_reply(instructions[1], {NAME: big}, 1000.0)]
    arrays, _ = dp.aggregate_train(1, replies)
    expected = (small + big / np.linalg.norm(big)) / 4  # weights ignored; divide by q·N = 4
    np.testing.assert_allclose(arrays[NAME].numpy(), expected, rtol=1e-5)
    counts = dp.take_events().central_counts
    assert counts is not None and counts.clipped == 1 and counts.aggregated == 2


def test_noise_std_is_z_times_clip_over_expected_count():
    settings = _privacy(noise_multiplier=2.0, clip=0.5, sample_rate=1.0, delta=1e-5)
    dp = ClientLevelDP(SharedModelFedAvg(STRATEGY_SETTINGS, k=10), settings, num_rounds=5, rng=np.random.default_rng(1))
    big = ArrayRecord({NAME: Array(np.zeros((200, 50), dtype=np.float32))})
    dp.configure_train(1, big, ConfigRecord(), FourNodeGrid())
    arrays, _ = dp.aggregate_train(1, [])  # no silo answered: a noise-only release
    assert arrays[NAME].numpy().std() == pytest.approx(2.0 * 0.5 / 4, rel=0.03)


def test_silos_are_poisson_sampled_at_rate_q():
    settings = _privacy(noise_multiplier=1.0, sample_rate=0.3, delta=1e-5, target_epsilon=0.0, accountant="rdp")
    dp = ClientLevelDP(SharedModelFedAvg(STRATEGY_SETTINGS, k=10), settings, num_rounds=500, rng=np.random.default_rng(2))
    counts = []
    for rnd in range(1, 401):
        counts.append(len(list(dp.configure_train(rnd, _current(), ConfigRecord(), FourNodeGrid()))))
        dp.aggregate_train(rnd, [])
    assert np.mean(counts) == pytest.approx(0.3 * 4, rel=0.1)
    assert min(counts) == 0 and max(counts) >= 3  # the batch size varies: Poisson, not fixed


def test_budget_stops_before_the_round_that_would_exceed():
    settings = _privacy(noise_multiplier=1.0, sample_rate=1.0, delta=1e-5, target_epsilon=5.0)
    dp = ClientLevelDP(SharedModelFedAvg(STRATEGY_SETTINGS, k=10), settings, num_rounds=100, rng=np.random.default_rng(3))
    released = 0
    for rnd in range(1, 100):
        if not list(dp.configure_train(rnd, _current(), ConfigRecord(), FourNodeGrid())):
            break
        dp.aggregate_train(rnd, [])
        released += 1
    assert dp.stop_reason is not None and f"round {released + 1}" in dp.stop_reason
    assert dp.accountant is not None and dp.accountant.epsilon() <= 5.0
    assert released >= 1


@pytest.mark.parametrize(
    ("aggregator", "sensitivity"),
    [("median", 0.5), ("trimmed-mean", 2 * 0.5 / (1 - 2 * 0.2) ** 0.5), ("krum", 1.0)],
)
def test_noise_on_a_robust_aggregate_is_z_times_that_aggregators_sensitivity(aggregator, sensitivity):
    # Arrange: no silo answers, so the release is noise alone, not divided by q·N.
    settings = _privacy(noise_multiplier=2.0, clip=0.5, sample_rate=1.0, delta=1e-5)
    dp = ClientLevelDP(
        SharedModelFedAvg(STRATEGY_SETTINGS, k=10), settings, num_rounds=5, rng=np.random.default_rng(4),
        aggregator=aggregator, trim_fraction=0.2,
    )
    big = ArrayRecord({NAME: Array(np.zeros((200, 50), dtype=np.float32))})
    dp.configure_train(1, big, ConfigRecord(), FourNodeGrid())
    # Act
    arrays, _ = dp.aggregate_train(1, [])
    # Assert: std z·Δ = 2 x (0.5 | 1.29 | 1.0), within 3 %
    assert arrays[NAME].numpy().std() == pytest.approx(2.0 * sensitivity, rel=0.03)
