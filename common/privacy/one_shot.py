"""One-shot empirical ε estimate from canary cosines (Andrew et al. 2024).

:func:`one_shot_epsilon` gives an *estimate*, not a bound (Andrew et al.,
"One-shot empirical privacy estimation for federated learning", ICLR 2024,
https://arxiv.org/abs/2302.03098).

What the ε covers depends on what a canary is: canary interactions audit
interaction-level privacy, canary users or clients audit user- or client-level
privacy. δ is always the δ the claim is stated at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.optimize
import scipy.stats

from common.privacy._checks import check_count

# At and above this dimension the null cosine law is N(0, 1/dim) to within
# numerical precision (the reference implementation's cut-off).
GAUSSIAN_NULL_MIN_DIM = 1000
# Thresholds swept by the exact-null (dim < 1000) estimate, as in the reference.
_NUM_THRESHOLDS = 10_000
# Cosines computed in floating point may exceed 1 in magnitude by rounding.
_COSINE_SLACK = 1e-9


def _log1m_exp(x: float) -> float:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends; ``-inf`` at 0."""
    if x >= 0.0:
        return -math.inf
    if x > -math.log(2.0):
        return math.log(-math.expm1(x))
    return math.log1p(-math.exp(x))


def _log_diff_exp(log_x: float, log_y: float) -> float:
    """``log(exp(log_x) - exp(log_y))``; ``-inf`` when the difference is <= 0."""
    if log_y >= log_x:
        return -math.inf
    return log_x + _log1m_exp(log_y - log_x)


def _log_mass_between(left: float, right: float, mu: float, std: float) -> float:
    """``log P[left < N(mu, std²) < right]``, from the tail where it is accurate."""
    if left > mu:
        return _log_diff_exp(_log_sf(left, mu, std), _log_sf(right, mu, std))
    return _log_diff_exp(_log_cdf(right, mu, std), _log_cdf(left, mu, std))


def _log_sf(t: float, mu: float, std: float) -> float:
    """``log P[N(mu, std²) > t]``, stable in the far tail."""
    return float(scipy.stats.norm.logcdf((mu - t) / std))


def _log_cdf(t: float, mu: float, std: float) -> float:
    """``log P[N(mu, std²) < t]``."""
    return float(scipy.stats.norm.logcdf((t - mu) / std))


def _log_delta_two_gaussians(
    mu1: float, std1: float, mu2: float, std2: float, epsilon: float
) -> float:
    """``log δ(ε)`` of P1 = N(mu1, std1²) against P2 = N(mu2, std2²).

    δ(ε) = P1[L > ε] - e^ε·P2[L > ε], L(y) = log p1(y)/p2(y) = a·y² + b·y + c;
    ``-inf`` when δ(ε) <= 0.
    """
    a = 0.5 * (std2**-2 - std1**-2)
    b = mu1 / std1**2 - mu2 / std2**2
    c = 0.5 * ((mu2 / std2) ** 2 - (mu1 / std1) ** 2) + math.log(std2) - math.log(std1)
    if a == 0.0:
        # L is linear: {L > ε} is a half-line, or empty/everything when b = 0.
        if b == 0.0:
            return -math.inf
        t = (epsilon - c) / b
        if b > 0:
            log_p1, log_p2 = _log_sf(t, mu1, std1), _log_sf(t, mu2, std2)
        else:
            log_p1, log_p2 = _log_cdf(t, mu1, std1), _log_cdf(t, mu2, std2)
    else:
        disc = b * b - 4.0 * a * (c - epsilon)
        if disc <= 0.0:
            # a·y² + b·y + c - ε has one sign everywhere: {L > ε} is empty (δ = 0)
            # or everything (δ = 1 - e^ε <= 0).
            return -math.inf
        # Stable roots (no cancellation when a is tiny against b).
        q = -0.5 * (b + math.copysign(math.sqrt(disc), b))
        roots = (q / a, (c - epsilon) / q)
        left, right = min(roots), max(roots)
        if a > 0:
            # Opens upward: {L > ε} is outside the roots.
            log_p1 = float(
                np.logaddexp(_log_cdf(left, mu1, std1), _log_sf(right, mu1, std1))
            )
            log_p2 = float(
                np.logaddexp(_log_cdf(left, mu2, std2), _log_sf(right, mu2, std2))
            )
        else:
            # Opens downward: {L > ε} is between the roots.
            log_p1 = _log_mass_between(left, right, mu1, std1)
            log_p2 = _log_mass_between(left, right, mu2, std2)
    if log_p1 == -math.inf:
        return -math.inf
    factor = epsilon + log_p2 - log_p1
    if factor >= 0.0:
        return -math.inf
    return log_p1 + _log1m_exp(factor)


def epsilon_two_gaussians(
    mu1: float, std1: float, mu2: float, std2: float, delta: float
) -> float:
    """Smallest ε at which N(mu1, std1²) and N(mu2, std2²) are (ε, δ)-close.

    Parameters
    ----------
    mu1, std1 : float
        Mean and standard deviation (> 0) of the first Gaussian.
    mu2, std2 : float
        Mean and standard deviation (> 0) of the second Gaussian.
    delta : float
        δ, in (0, 1).

    Returns
    -------
    float
        The exact ε (both directions of the hockey-stick divergence), 0.0 if the
        two are already (0, δ)-indistinguishable.

    Raises
    ------
    ValueError
        If a standard deviation is not positive and finite, or δ not in (0, 1).

    Notes
    -----
    Port of ``epsilon_two_gaussians`` in google-research/federated
    ``one_shot_epe/empirical_privacy_estimation_lib.py`` (privacy loss of two
    Gaussians, Steinke, https://arxiv.org/abs/2210.00597). With equal standard
    deviations σ this is the ε of the Gaussian mechanism with sensitivity
    ``|mu1 - mu2|`` and noise σ. Differences from the reference: the roots of the
    privacy-loss quadratic use the cancellation-free formula, and the equal-std
    branch handles ``mu1 > mu2`` and ``mu1 == mu2`` itself instead of relying on
    the other direction of the max.
    """
    for name, value in (("mu1", mu1), ("mu2", mu2)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    for name, value in (("std1", std1), ("std2", std2)):
        if not (math.isfinite(value) and value > 0.0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not (math.isfinite(delta) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")

    def excess(epsilon: float) -> float:
        worst = max(
            _log_delta_two_gaussians(mu1, std1, mu2, std2, epsilon),
            _log_delta_two_gaussians(mu2, std2, mu1, std1, epsilon),
        )
        return worst - math.log(delta)

    if excess(0.0) <= 0.0:
        return 0.0
    lo, hi = 0.0, 1.0
    while excess(hi) > 0.0:
        lo, hi = hi, 10.0 * hi
    return float(scipy.optimize.brentq(excess, lo, hi, xtol=1e-12))


def _epsilon_threshold_sweep(
    log_fprs: npt.NDArray[np.float64], fnrs: npt.NDArray[np.float64], delta: float
) -> float:
    """Max over thresholds of the ε implied by FPR/FNR pairs (reference formula)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        bound1 = np.log(1.0 - delta - fnrs) - log_fprs
        bound2 = np.log(1.0 - delta - np.exp(log_fprs)) - np.log(fnrs)
    eps = np.fmax(bound1, bound2)  # NaN where a bound is undefined
    if np.all(np.isnan(eps)):
        return 0.0
    return max(0.0, float(np.nanmax(eps)))


def _epsilon_exact_null(mu: float, std: float, dim: int, delta: float) -> float:
    """ε of an exact-cosine null against N(mu, std²) by a threshold sweep."""
    # The cosine X of a uniform unit vector in R^dim with a fixed one has
    # (1 + X)/2 ~ Beta((dim-1)/2, (dim-1)/2).
    shape = 0.5 * (dim - 1)
    null = scipy.stats.beta(shape, shape, loc=-1.0, scale=2.0)
    alt = scipy.stats.norm(mu, std)
    # Thresholds where neither rate exceeds 1 - δ (reference range). With mu <= 0
    # the reference raises; this range is widened to cover both laws instead.
    lb, ub = float(null.ppf(delta)), float(alt.ppf(1.0 - delta))
    if mu <= 0.0:
        lb = min(lb, float(alt.ppf(delta)))
        ub = max(ub, float(null.ppf(1.0 - delta)))
    thresholds = np.linspace(lb, ub, _NUM_THRESHOLDS)  # (T,)
    # FPR(t) = P[X >= t] = P[X <= -t] by symmetry (log-space for the far tail).
    log_fprs = np.asarray(null.logcdf(-thresholds), dtype=np.float64)
    fnrs = np.asarray(alt.cdf(thresholds), dtype=np.float64)
    return _epsilon_threshold_sweep(log_fprs, fnrs, delta)


@dataclass(frozen=True, slots=True)
class OneShotEstimate:
    """One-shot empirical ε estimate (Andrew et al. 2024); an estimate, not a bound.

    Attributes
    ----------
    epsilon : float
        Estimated ε at ``delta``.
    mu, sigma : float
        Sample mean and standard deviation (ddof=1) of the inserted canaries'
        cosines.
    null_sigma : float
        Standard deviation of the null cosine law, ``1/sqrt(dim)``.
    count : int
        Number of inserted canaries.
    dim : int
        Dimension of the parameter vector the cosines were taken in.
    delta : float
        δ of the estimate.
    """

    epsilon: float
    mu: float
    sigma: float
    null_sigma: float
    count: int
    dim: int
    delta: float

    def to_dict(self) -> dict[str, int | float]:
        """JSON-able form."""
        return {
            "epsilon": self.epsilon,
            "mu": self.mu,
            "sigma": self.sigma,
            "null_sigma": self.null_sigma,
            "count": self.count,
            "dim": self.dim,
            "delta": self.delta,
        }


def one_shot_epsilon(cosines: npt.ArrayLike, dim: int, delta: float) -> OneShotEstimate:
    """Estimate ε from the cosines of inserted canaries with the final model change.

    Parameters
    ----------
    cosines : array_like, shape (k,)
        ``cos(c_i, Δ)`` for each inserted canary direction ``c_i`` and the final
        model change Δ, signed so that an inserted canary pushes its cosine up
        (``k >= 2``, not all equal).
    dim : int
        Number of parameters the directions live in (>= 2).
    delta : float
        δ of the estimate, in (0, 1).

    Returns
    -------
    OneShotEstimate
        The ε at which N(μ̂, σ̂²) of the cosines and the null law of a random
        direction's cosine are (ε, δ)-indistinguishable.

    Raises
    ------
    ValueError
        If there are fewer than two cosines, they are all equal, a cosine is
        non-finite or outside [-1, 1], ``dim < 2`` or δ not in (0, 1).
    TypeError
        If ``dim`` is not an int.

    Notes
    -----
    Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot empirical privacy
    estimation for federated learning", ICLR 2024, https://arxiv.org/abs/2302.03098,
    following ``epsilon_closed_form_null_gaussian_alt`` in google-research/federated
    ``one_shot_epe``. A canary client returns an update along a fixed random unit
    direction, clipped to the clip norm; the cosine of an *un*-inserted random
    direction with Δ has the null law of a uniform unit vector, ≈ N(0, 1/dim). For
    ``dim >= 1000`` the ε is that of the two Gaussians N(0, 1/dim) and N(μ̂, σ̂²)
    (:func:`epsilon_two_gaussians`); below, the null is the exact cosine law and ε
    is maximised over 10,000 thresholds of the test "cosine >= t", as in the
    reference. This is an *estimate* of the ε of the threat model where only the
    final model is released: it is neither an upper nor a lower bound, and it can
    exceed the accountant's ε by sampling noise in the fitted μ̂, σ̂. At small δ it
    is sensitive to σ̂ against ``1/sqrt(dim)``: with no signal at all, 1000 null
    cosines in dim 1000 still give ε̂ up to about 0.7 at δ = 1e-5, so use on the
    order of 1000 canaries. The reference takes cosines with the negated model
    delta (its clients' updates enter with a minus sign); pass whichever sign makes
    inserted canaries' cosines positive in expectation.
    """
    values = np.asarray(cosines, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(
            f"cosines must be 1-D with at least 2 canaries, got shape {values.shape}"
        )
    if not np.all(np.isfinite(values)) or np.any(np.abs(values) > 1.0 + _COSINE_SLACK):
        raise ValueError(
            "cosines must be finite and in [-1, 1]: pass cosines, not dots"
        )
    check_count("dim", dim, 2)
    if not (math.isfinite(delta) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if np.all(values == values[0]):
        raise ValueError("all cosines are equal: cannot fit a Gaussian to them")
    mu = float(np.mean(values))
    sigma = float(np.std(values, ddof=1))
    null_sigma = 1.0 / math.sqrt(dim)
    if dim >= GAUSSIAN_NULL_MIN_DIM:
        epsilon = epsilon_two_gaussians(0.0, null_sigma, mu, sigma, delta)
    else:
        epsilon = _epsilon_exact_null(mu, sigma, int(dim), delta)
    return OneShotEstimate(
        epsilon=epsilon,
        mu=mu,
        sigma=sigma,
        null_sigma=null_sigma,
        count=int(values.size),
        dim=int(dim),
        delta=delta,
    )
