"""Distributed user-level DP: the noise-share rule (through the secure sum), clipping, histogram, ε replay."""

import collections
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from common.privacy import distributed as dd
from common.secagg.protocol import COLLECT, SecAggError
from common.secagg.quantize import range_for
from tests.common.test_secagg_protocol import run


def test_noise_share_rule_by_hand():
    # σ = 1, C = 2, S = 5, T = 1: each share 2/sqrt(4) = 1; any 4 shares carry std 2 = σC
    assert dd.noise_share_std(1.0, 2.0, 5, 1) == pytest.approx(1.0)
    assert dd.noise_price(5, 1) == pytest.approx(math.sqrt(5 / 4))
    assert dd.noise_share_std(1.0, 2.0, 5, 0) == pytest.approx(2 / math.sqrt(5))


def test_round_noise_multiplier_after_dropouts():
    assert dd.round_noise_multiplier(1.2, 5, 1, 0) == pytest.approx(1.2)
    assert dd.round_noise_multiplier(1.2, 5, 1, 1) == pytest.approx(1.2)  # within the T budgeted for
    assert dd.round_noise_multiplier(1.2, 5, 1, 2) == pytest.approx(1.2 * math.sqrt(3 / 4))
    assert dd.round_noise_multiplier(1.2, 5, 1, 5) == 0.0


def test_secagg_threshold_refuses_sums_missing_more_than_t_silos():
    assert dd.secagg_threshold(5, 1) == 4  # S − T beats the majority 3
    assert dd.secagg_threshold(5, 3) == 3  # the majority floor
    assert dd.secagg_threshold(20, 2) == 18
    vectors = {n: np.zeros(10) for n in range(1, 6)}
    with pytest.raises(SecAggError, match="fewer than the threshold 4"):
        run(vectors, drop={COLLECT: {1, 2}}, threshold=dd.secagg_threshold(5, 1))


@pytest.mark.parametrize(("silos", "t"), [(5, 5), (5, -1), (0, 0)])
def test_bad_silo_counts_are_named(silos, t):
    with pytest.raises(dd.DistributedDPError, match="silos"):
        dd.noise_share_std(1.0, 1.0, silos, t)


def test_noise_on_the_secure_sum_has_std_sigma_c_and_each_share_sigma_c_over_sqrt_s_minus_t():
    sigma, clip, silos, t, d = 1.5, 0.8, 5, 1, 40_000
    share = dd.noise_share_std(sigma, clip, silos, t)  # 0.6
    rng = np.random.default_rng(21)
    shares = {n: dd.silo_contribution([], d, clip, share, rng) for n in range(1, silos + 1)}
    r = range_for(0.0, share, d)
    seen: dict = {}
    full = run(shares, clip_range=r, seen=seen)
    dropped = run(shares, clip_range=r, drop={COLLECT: {5}})
    # sample std of n normals has relative standard error 1/sqrt(2n) = 0.35%; tolerance 2% (> 5 errors)
    for n, v in shares.items():
        assert np.std(v) == pytest.approx(share, rel=0.02), n
    assert np.std(dropped.total) == pytest.approx(sigma * clip, rel=0.02)  # S - T honest shares: σC
    assert np.std(full.total) == pytest.approx(sigma * clip * dd.noise_price(silos, t), rel=0.02)
    assert np.abs(full.total - sum(shares.values())).max() < full.error_bound


def test_clipping_of_a_users_delta_by_hand():
    np.testing.assert_allclose(dd.clip_to_norm(np.array([3.0, 4.0]), 1.0), [0.6, 0.8])
    np.testing.assert_array_equal(dd.clip_to_norm(np.array([0.3, 0.4]), 1.0), [0.3, 0.4])


def test_silo_contribution_without_noise_is_the_sum_of_clipped_deltas(rng):
    out = dd.silo_contribution([np.array([3.0, 4.0]), np.array([0.0, 0.5])], 2, 1.0, 0.0, rng)
    np.testing.assert_allclose(out, [0.6, 1.3])
    with pytest.raises(dd.DistributedDPError, match="has 3 values"):
        dd.silo_contribution([np.zeros(3)], 2, 1.0, 0.0, rng)


def test_server_divides_by_the_expected_not_the_realised_number_of_users():
    q = dd.sample_rate(50, 1000)
    assert q == 0.05
    np.testing.assert_allclose(dd.server_average(np.array([10.0, -5.0]), q * 1000), [0.2, -0.1])


def test_poisson_sampling_rate(rng):
    picked = dd.poisson_sample(100_000, 0.05, rng)
    # binomial std sqrt(n q (1-q)) = 69; allow 5 of them
    assert abs(picked.size - 5000) < 5 * 69


def test_histogram_contributions_are_bounded(rng):
    v = dd.user_item_vector([3, 1, 3, 7], 8, "l2", 0, rng)
    np.testing.assert_allclose(v[[1, 3, 7]], 1 / math.sqrt(3))
    assert np.linalg.norm(v) == pytest.approx(1.0) and dd.histogram_sensitivity("l2", 0) == 1.0
    c = dd.user_item_vector(list(range(8)), 8, "cap", 3, rng)
    assert c.sum() == 3 and set(np.unique(c)) == {0.0, 1.0}
    assert dd.histogram_sensitivity("cap", 3) == pytest.approx(math.sqrt(3))
    assert np.linalg.norm(c) <= dd.histogram_sensitivity("cap", 3) + 1e-12
    assert dd.user_item_vector([], 8, "cap", 3, rng).sum() == 0
    with pytest.raises(dd.DistributedDPError, match="indices"):
        dd.user_item_vector([8], 8, "l2", 0, rng)


def _ledger(rounds, sigma, q, dropped_per_round, silos=5, t=1):
    return [
        dd.event_parameters(
            dd.KIND_TRAINING, server_round=r, noise_multiplier=sigma, rate=q, clip=1.0, population=943,
            silos=silos, max_dishonest=t, survivors=list(range(silos - d)), dropped=list(range(silos - d, silos)),
        )
        for r, d in zip(range(1, rounds + 1), dropped_per_round, strict=True)
    ]  # fmt: skip


def test_epsilon_of_the_union_population_replays_with_dp_accounting_alone():
    sigma, q, delta = 1.1, 0.05, 1e-4
    dropped = [0] * 30 + [2] + [0] * 19  # round 31 lost two silos: more than T = 1
    events = _ledger(50, sigma, q, dropped)
    assert events[30]["noise-multiplier"] == pytest.approx(sigma * math.sqrt(3 / 4))
    uses = [dd.training_use(e["noise-multiplier"], e["sample-rate"]) for e in events]
    histogram = dd.histogram_use(8.0)
    eps = dd.union_epsilon(uses, delta, histogram)

    # replay from the events' own fields, dp-accounting only
    acc = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    counts = collections.Counter((e["noise-multiplier"], e["sample-rate"]) for e in events)
    for (s, rate), n in counts.items():
        acc.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(s)), n)
    acc.compose(dp_accounting.GaussianDpEvent(8.0))
    assert eps == pytest.approx(acc.get_epsilon(delta), rel=1e-3)

    # RDP is an upper bound; the histogram and the weak round both cost something
    upper = rdp.RdpAccountant()
    upper.compose(dd.union_dp_event(uses, histogram))
    assert eps <= upper.get_epsilon(delta)
    without_histogram = dd.union_epsilon(uses, delta)
    assert without_histogram < eps
    assert dd.union_epsilon([dd.training_use(sigma, q)] * 50, delta) < without_histogram


def test_event_parameters_describe_the_release():
    (e,) = _ledger(1, 1.0, 0.1, [0])
    assert e["unit"] == "user" and e["sampling"] == "poisson" and e["steps"] == 1
    assert e["noise-share-std"] == pytest.approx(0.5) and e["expected-users"] == pytest.approx(94.3)
    with pytest.raises(dd.DistributedDPError, match="kind"):
        dd.event_parameters("dp-sgd", server_round=1, noise_multiplier=1.0, rate=0.1, clip=1.0, population=10,
                            silos=5, max_dishonest=1, survivors=[], dropped=[])  # fmt: skip
    assert dd.union_epsilon([dd.training_use(0.0, 0.1)], 1e-5) == math.inf
