"""Empirical privacy: one-run audit bounds and the one-shot canary estimate."""

import itertools
import json
import math

import dp_accounting
import numpy as np
import pytest
import scipy.stats
from dp_accounting import pld

from common.privacy.empirical import (
    DEFAULT_GUESS_FRACTIONS,
    default_guess_counts,
    epsilon_two_gaussians,
    one_run_audit,
    one_run_epsilon_lb,
    one_run_p_value,
    one_shot_epsilon,
)

DELTA = 1e-5


def _pld_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier))
    return float(accountant.get_epsilon(delta))


# --- one-run p-value and bound -------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "r", "v", "expected"),
    [
        (1000, 100, 100, 3.47),  # Steinke et al. reference values, δ = 1e-5
        (1000, 500, 400, 1.20),
        (100_000, 1000, 1000, 3.49),  # 2mδ = 2: the δ term bites
    ],
)
def test_one_run_epsilon_lb_reference_values(m, r, v, expected):
    # Act
    bound = one_run_epsilon_lb(m, r, v, DELTA, confidence=0.95)

    # Assert
    assert bound == pytest.approx(expected, abs=0.02)


def test_p_value_hand_computed():
    # q = 1/2 at ε = 0. β = P[B(2, ½) >= 2] = 1/4.
    # α = max(P[B = 1]/1, P[0 <= B < 2]/2) = max(1/2, 3/8) = 1/2.
    assert one_run_p_value(10, 2, 2, 0.0, 0.0) == pytest.approx(0.25)
    assert one_run_p_value(10, 2, 2, 0.0, 0.01) == pytest.approx(
        0.25 + 2 * 10 * 0.01 * 0.5
    )
    # No correct guesses: nothing can be rejected.
    assert one_run_p_value(10, 5, 0, 3.0, DELTA) == 1.0


@pytest.mark.parametrize(
    ("m", "r", "v"), [(1000, 100, 100), (1000, 500, 400), (100_000, 1000, 1000)]
)
def test_p_value_is_monotone_in_epsilon_and_grows_with_delta(m, r, v):
    # Arrange
    grid = np.linspace(0.0, 15.0, 301)

    # Act
    p = np.array([one_run_p_value(m, r, v, e, DELTA) for e in grid])
    p0 = np.array([one_run_p_value(m, r, v, e, 0.0) for e in grid])

    # Assert
    assert np.all(np.diff(p) >= -1e-12)
    assert p[0] < 0.05 < p[-1]  # the grid spans the rejection boundary
    assert np.all(p >= p0)
    assert np.any(p > p0 + 1e-6)  # δ actually enters


def test_epsilon_lb_sits_on_the_rejection_boundary():
    # Act
    bound = one_run_epsilon_lb(1000, 500, 400, DELTA, confidence=0.95)

    # Assert: the claim at ε_LB is rejected, a slightly larger one is not.
    assert one_run_p_value(1000, 500, 400, bound, DELTA) <= 0.05
    assert one_run_p_value(1000, 500, 400, bound + 1e-4, DELTA) > 0.05


def test_epsilon_lb_is_zero_when_nothing_is_rejected():
    assert one_run_epsilon_lb(1000, 10, 5, DELTA) == 0.0
    assert one_run_epsilon_lb(1000, 10, 0, DELTA) == 0.0
    # 6/6 correct: P = 1/64 ≈ 0.016 at ε = 0, rejected at 95% but not at 99%.
    assert one_run_epsilon_lb(1000, 6, 6, DELTA, confidence=0.95) > 0.0
    assert one_run_epsilon_lb(1000, 6, 6, DELTA, confidence=0.99) == 0.0


def test_epsilon_lb_shrinks_with_confidence():
    bounds = [
        one_run_epsilon_lb(1000, 500, 400, DELTA, c) for c in (0.5, 0.9, 0.95, 0.999)
    ]
    assert all(a > b for a, b in itertools.pairwise(bounds))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"m": 10, "r": 11, "v": 1, "epsilon": 1.0, "delta": DELTA},
        {"m": 10, "r": 5, "v": 6, "epsilon": 1.0, "delta": DELTA},
        {"m": 10, "r": 5, "v": 3, "epsilon": -1.0, "delta": DELTA},
        {"m": 10, "r": 5, "v": 3, "epsilon": math.inf, "delta": DELTA},
        {"m": 10, "r": 5, "v": 3, "epsilon": 1.0, "delta": 1.0},
    ],
)
def test_p_value_rejects_bad_input(kwargs):
    with pytest.raises(ValueError, match=r"must|need"):
        one_run_p_value(**kwargs)


def test_epsilon_lb_rejects_bad_confidence():
    with pytest.raises(ValueError, match="confidence"):
        one_run_epsilon_lb(1000, 10, 10, DELTA, confidence=1.0)


# --- one-run audit over guess counts -------------------------------------------------


def test_default_guess_grid():
    assert DEFAULT_GUESS_FRACTIONS == (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    assert default_guess_counts(1000) == [
        (k, k) for k in (5, 10, 25, 50, 100, 150, 250)
    ]
    assert default_guess_counts(3) == [(1, 1)]  # deduplicated, >= 1
    with pytest.raises(ValueError, match="m must be >= 2"):
        default_guess_counts(1)


def test_random_guesses_give_no_bound():
    # Scores independent of inclusion: the bound is valid at 95%, so almost always 0.
    bounds = []
    for seed in range(10):
        # Arrange
        rng = np.random.default_rng(seed)
        included = rng.random(1000) < 0.5
        scores = rng.normal(size=1000)

        # Act
        bounds.append(one_run_audit(scores, included, DELTA, rng=rng).epsilon_lb)

    # Assert
    assert max(bounds) <= 0.5
    assert sum(b == 0.0 for b in bounds) >= 8


def test_perfect_separation_gives_large_bound_from_the_widest_candidate():
    # Arrange
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    scores = included + 0.1 * rng.random(1000)

    # Act
    audit = one_run_audit(scores, included, DELTA, rng=rng)

    # Assert
    assert audit.epsilon_lb > 4.0
    assert (audit.k_plus, audit.k_minus, audit.r, audit.v) == (250, 250, 500, 500)
    assert all(c.v == c.r for c in audit.candidates)
    assert audit.epsilon_lb == pytest.approx(
        one_run_epsilon_lb(1000, 500, 500, DELTA, 1 - 0.05 / 7)
    )


def test_bonferroni_correction_over_the_candidate_table():
    # Arrange: a leaky but imperfect attack.
    rng = np.random.default_rng(7)
    included = rng.random(1000) < 0.5
    scores = 2.0 * included + rng.normal(size=1000)

    # Act
    audit = one_run_audit(scores, included, DELTA, confidence=0.95, rng=rng)

    # Assert
    k = len(audit.candidates)
    assert k == 7
    assert audit.per_candidate_confidence == pytest.approx(1 - 0.05 / k)
    for cand in audit.candidates:
        assert cand.r == cand.k_plus + cand.k_minus
        assert cand.epsilon_lb == pytest.approx(
            one_run_epsilon_lb(1000, cand.r, cand.v, DELTA, 1 - 0.05 / k), abs=1e-9
        )
    assert audit.epsilon_lb == max(c.epsilon_lb for c in audit.candidates)
    assert audit.epsilon_lb > 0.5
    # The correction costs something: the same counts at uncorrected 95% give more.
    assert (
        one_run_epsilon_lb(1000, audit.r, audit.v, DELTA, 0.95)
        > audit.epsilon_lb + 0.05
    )


def test_guess_counts_are_counted_exactly():
    # Arrange: ranks 0..5 by score; top 2 = idx 0 (in, right), 1 (out, wrong);
    # bottom 2 = idx 5 (in, wrong), 4 (out, right).
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, False, True])

    # Act
    audit = one_run_audit(
        scores, included, DELTA, guess_counts=[(2, 2), (1, 0), (0, 3)]
    )

    # Assert
    table = [(c.k_plus, c.k_minus, c.r, c.v) for c in audit.candidates]
    assert table == [(2, 2, 4, 2), (1, 0, 1, 1), (0, 3, 3, 2)]
    assert audit.per_candidate_confidence == pytest.approx(1 - 0.05 / 3)


@pytest.mark.parametrize("first_half_included", [True, False])
def test_ties_are_broken_without_looking_at_inclusion(first_half_included):
    # Arrange: all scores equal. Ordering ties by index (or by `included`) would put
    # one half on top and the other at the bottom: every guess right, ε_LB ~ 4.5.
    included = np.zeros(1000, dtype=bool)
    if first_half_included:
        included[:500] = True
    else:
        included[500:] = True
    scores = np.zeros(1000)

    # Act
    audit = one_run_audit(scores, included, DELTA, rng=np.random.default_rng(3))

    # Assert
    assert audit.epsilon_lb < 0.5


def test_default_rng_is_reproducible():
    included = np.arange(100) % 3 == 0
    scores = (np.arange(100) % 5).astype(float)
    assert one_run_audit(scores, included, DELTA) == one_run_audit(
        scores, included, DELTA
    )


def test_audit_to_dict_is_json():
    # Arrange
    rng = np.random.default_rng(1)
    included = rng.random(200) < 0.5

    # Act
    payload = json.loads(
        json.dumps(one_run_audit(included + rng.random(200), included, DELTA).to_dict())
    )

    # Assert
    assert payload["m"] == 200
    assert payload["delta"] == DELTA
    assert len(payload["candidates"]) == len(default_guess_counts(200))
    assert set(payload["candidates"][0]) == {
        "k_plus",
        "k_minus",
        "r",
        "v",
        "epsilon_lb",
    }


@pytest.mark.parametrize(
    ("scores", "included", "kwargs", "match"),
    [
        ([1.0, 2.0], [True], {}, "shape"),
        ([1.0, 2.0], [1, 0], {}, "bool"),
        ([1.0, math.nan], [True, False], {}, "finite"),
        ([1.0, 2.0], [True, False], {"guess_counts": [(2, 1)]}, "guess counts"),
        ([1.0, 2.0], [True, False], {"guess_counts": [(0, 0)]}, "guess counts"),
        ([1.0, 2.0], [True, False], {"guess_counts": []}, "empty"),
        ([1.0, 2.0], [True, False], {"confidence": 0.0}, "confidence"),
    ],
)
def test_audit_rejects_bad_input(scores, included, kwargs, match):
    with pytest.raises(ValueError, match=match):
        one_run_audit(np.array(scores), np.array(included), DELTA, **kwargs)


# --- two Gaussians and the one-shot estimate -----------------------------------------


@pytest.fixture(scope="module")
def pld_epsilon_z1() -> float:
    """PLD ε of one Gaussian mechanism with noise multiplier 1 at δ = 1e-5."""
    return _pld_gaussian_epsilon(1.0, DELTA)


def test_two_gaussians_with_equal_std_is_the_gaussian_mechanism(pld_epsilon_z1):
    # N(0, 1) vs N(1, 1) is the Gaussian mechanism with sensitivity 1 and noise 1.
    assert pld_epsilon_z1 == pytest.approx(4.3772, abs=1e-3)
    assert epsilon_two_gaussians(0.0, 1.0, 1.0, 1.0, DELTA) == pytest.approx(
        pld_epsilon_z1, abs=1e-3
    )
    # Order and a hair of std difference (the quadratic code path) do not matter.
    assert epsilon_two_gaussians(1.0, 1.0, 0.0, 1.0, DELTA) == pytest.approx(
        pld_epsilon_z1, abs=1e-3
    )
    assert epsilon_two_gaussians(0.0, 1.0, 1.0, 1.0 + 1e-12, DELTA) == pytest.approx(
        pld_epsilon_z1, abs=1e-3
    )


@pytest.mark.parametrize("noise_multiplier", [0.5, 0.7, 2.0, 5.0])
def test_two_gaussians_with_equal_std_solves_the_analytic_gaussian_delta(
    noise_multiplier,
):
    # Act
    eps = epsilon_two_gaussians(0.0, noise_multiplier, 1.0, noise_multiplier, DELTA)

    # Assert: Balle & Wang (2018), δ(ε) = Φ(1/2z - εz) - e^ε Φ(-1/2z - εz).
    z = noise_multiplier
    upper = scipy.stats.norm.cdf(0.5 / z - eps * z)
    lower = scipy.stats.norm.cdf(-0.5 / z - eps * z)
    delta = upper - math.exp(eps) * lower
    assert eps > 0.0
    assert delta == pytest.approx(DELTA, rel=1e-6)


@pytest.mark.parametrize(
    ("mu1", "std1", "mu2", "std2"), [(0.0, 1.0, 0.5, 1.6), (2.0, 0.8, 0.0, 1.0)]
)
def test_two_gaussians_with_unequal_std_matches_numerical_hockey_stick(
    mu1, std1, mu2, std2
):
    # Arrange
    delta = 1e-3
    y = np.linspace(-20.0, 20.0, 400_001)
    p1 = scipy.stats.norm.pdf(y, mu1, std1)
    p2 = scipy.stats.norm.pdf(y, mu2, std2)

    # Act
    eps = epsilon_two_gaussians(mu1, std1, mu2, std2, delta)

    # Assert: the larger of the two hockey-stick divergences at ε equals δ.
    dy = y[1] - y[0]
    worst = max(
        np.sum(np.maximum(p1 - math.exp(eps) * p2, 0.0)) * dy,
        np.sum(np.maximum(p2 - math.exp(eps) * p1, 0.0)) * dy,
    )
    assert eps > 0.5
    assert worst == pytest.approx(delta, rel=1e-3)


def test_identical_gaussians_have_zero_epsilon():
    assert epsilon_two_gaussians(0.3, 0.1, 0.3, 0.1, DELTA) == 0.0


def _cosines_with_moments(mu: float, std: float, count: int) -> np.ndarray:
    z = np.random.default_rng(0).normal(size=count)
    z = (z - z.mean()) / z.std(ddof=1)
    return mu + std * z


@pytest.mark.parametrize(("dim", "expected"), [(200, 2.375326), (2000, 2.317789)])
def test_one_shot_reference_regression(dim, expected):
    # Values from google-research/federated one_shot_epe's regression test:
    # μ = σ = dim^-1/2, δ = 1e-2 (exact cosine null below dim 1000, Gaussian above).
    # Arrange
    cosines = _cosines_with_moments(dim**-0.5, dim**-0.5, 100)

    # Act
    estimate = one_shot_epsilon(cosines, dim, 1e-2)

    # Assert
    assert estimate.epsilon == pytest.approx(expected, abs=1e-4)
    assert estimate.mu == pytest.approx(dim**-0.5)
    assert estimate.sigma == pytest.approx(dim**-0.5)
    assert estimate.null_sigma == pytest.approx(dim**-0.5)
    assert estimate.count == 100


def test_one_shot_estimates_a_simulated_gaussian_mechanism(pld_epsilon_z1):
    # Arrange: k canaries, each a random unit direction scaled to the clip norm C = 1,
    # summed with Gaussian noise of std z·C. dim = 10,000 ≫ k keeps the canaries
    # nearly orthogonal (with dim = 1000 they add (k-1)/dim to each other's variance).
    dim, k, z = 10_000, 1000, 1.0
    true_epsilon = pld_epsilon_z1  # ≈ 4.38
    estimates = []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        canaries = rng.normal(size=(k, dim))  # (k, D)
        canaries /= np.linalg.norm(canaries, axis=1, keepdims=True)
        change = canaries.sum(axis=0) + rng.normal(scale=z, size=dim)  # (D,)
        cosines = canaries @ change / np.linalg.norm(change)  # (k,)

        # Act
        estimates.append(one_shot_epsilon(cosines, dim, DELTA).epsilon)

    # Assert
    for estimate in estimates:
        assert true_epsilon / 1.5 < estimate < true_epsilon * 1.5
    assert np.mean(estimates) == pytest.approx(true_epsilon, rel=0.25)


def test_one_shot_estimate_grows_with_noise_removed():
    # Less noise (larger μ in null-std units) means a larger ε estimate.
    dim = 5000
    estimates = [
        one_shot_epsilon(
            _cosines_with_moments(s * dim**-0.5, dim**-0.5, 500), dim, DELTA
        ).epsilon
        for s in (0.25, 0.5, 1.0, 2.0)
    ]
    assert all(a < b for a, b in itertools.pairwise(estimates))


def test_one_shot_estimate_without_canary_signal_is_near_zero():
    dim, k = 1000, 1000
    estimates = []
    for seed in range(5):
        # Arrange: cosines of never-inserted directions, ~ N(0, 1/dim).
        cosines = np.random.default_rng(seed).normal(scale=dim**-0.5, size=k)

        # Act
        estimates.append(one_shot_epsilon(cosines, dim, DELTA).epsilon)

    # Assert: only the sampling error of (μ̂, σ̂) is left; far below the ~4.4 of z = 1.
    assert max(estimates) < 1.0
    assert np.median(estimates) < 0.6
    # Exactly null moments give exactly zero.
    assert (
        one_shot_epsilon(_cosines_with_moments(0.0, dim**-0.5, k), dim, DELTA).epsilon
        == 0.0
    )


def test_one_shot_small_dim_without_signal_is_small():
    # Below dim 1000 the exact null is used; μ <= 0 must not fail.
    cosines = np.random.default_rng(0).normal(scale=200**-0.5, size=1000)
    estimate = one_shot_epsilon(cosines - abs(cosines.mean()), 200, DELTA)
    assert estimate.mu <= 0.0
    assert 0.0 <= estimate.epsilon < 1.0


def test_one_shot_to_dict_is_json():
    estimate = one_shot_epsilon(_cosines_with_moments(0.03, 0.03, 50), 1000, DELTA)
    payload = json.loads(json.dumps(estimate.to_dict()))
    assert payload == {
        "epsilon": estimate.epsilon,
        "mu": estimate.mu,
        "sigma": estimate.sigma,
        "null_sigma": estimate.null_sigma,
        "count": 50,
        "dim": 1000,
        "delta": DELTA,
    }


@pytest.mark.parametrize(
    ("cosines", "dim", "delta", "match"),
    [
        ([0.1], 1000, DELTA, "at least 2"),
        ([0.1, 0.1, 0.1], 1000, DELTA, "equal"),
        ([0.1, 1.5], 1000, DELTA, r"\[-1, 1\]"),
        ([0.1, math.nan], 1000, DELTA, "finite"),
        ([0.1, 0.2], 1, DELTA, "dim"),
        ([0.1, 0.2], 1000, 0.0, "delta"),
    ],
)
def test_one_shot_rejects_bad_input(cosines, dim, delta, match):
    with pytest.raises(ValueError, match=match):
        one_shot_epsilon(cosines, dim, delta)
