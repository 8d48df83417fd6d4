"""One-shot canary estimate and the ε of two Gaussians."""

import itertools
import json
import math

import dp_accounting
import numpy as np
import pytest
import scipy.stats
from dp_accounting import pld

from common.privacy.one_shot import epsilon_two_gaussians, one_shot_epsilon

DELTA = 1e-5


def _pld_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier))
    return float(accountant.get_epsilon(delta))


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
