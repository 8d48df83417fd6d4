"""Empirical privacy: one-run audit lower bounds and the one-shot canary estimate.

Two tools, with different guarantees:

* :func:`one_run_audit` / :func:`one_run_epsilon_lb` give a *lower bound* on ε that
  holds with the stated confidence (Steinke, Nasr and Jagielski, "Privacy auditing
  with one (1) training run", NeurIPS 2023, https://arxiv.org/abs/2305.08846). If a
  run claims (ε, δ)-DP and the bound exceeds that ε, the claim (or the code) is wrong.
  One-run bounds are loose: use them as a bug detector, not as a tight estimate.
* :func:`one_shot_epsilon` gives an *estimate*, not a bound (Andrew et al.,
  "One-shot empirical privacy estimation for federated learning", ICLR 2024,
  https://arxiv.org/abs/2302.03098).

What the ε covers depends on what a canary is: canary interactions audit
interaction-level privacy, canary users or clients audit user- or client-level
privacy. δ is always the δ the claim is stated at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.optimize
import scipy.special
import scipy.stats

# Symmetric guess counts k+ = k- = max(1, ⌊f·⌊m/2⌋⌋) for each fraction f: the grid is
# fixed before the scores are seen, so a Bonferroni correction over it is valid.
DEFAULT_GUESS_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
# Bisection stops when the bracket on ε is this narrow.
_EPSILON_TOL = 1e-6
# At and above this dimension the null cosine law is N(0, 1/dim) to within
# numerical precision (the reference implementation's cut-off).
GAUSSIAN_NULL_MIN_DIM = 1000
# Thresholds swept by the exact-null (dim < 1000) estimate, as in the reference.
_NUM_THRESHOLDS = 10_000
# Cosines computed in floating point may exceed 1 in magnitude by rounding.
_COSINE_SLACK = 1e-9


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_unit_open(name: str, value: float) -> None:
    if isinstance(value, bool) or not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be a finite number in (0, 1), got {value!r}")


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not (math.isfinite(delta) and 0.0 <= delta < 1.0):
        raise ValueError(f"delta must be a finite number in [0, 1), got {delta!r}")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of ``v`` correct out of ``r`` guesses under an (ε, δ)-DP claim.

    Parameters
    ----------
    m : int
        Number of canaries, each included independently with probability ½.
    r : int
        Number of guesses made (``r <= m``); the other canaries are abstained on.
    v : int
        Number of correct guesses (``v <= r``).
    epsilon : float
        The ε of the claim being tested (>= 0).
    delta : float
        The δ of the claim being tested, in [0, 1).

    Returns
    -------
    float
        ``min(1, P[Binomial(r, q) >= v] + 2·m·δ·α)`` with ``q = e^ε / (1 + e^ε)`` and
        ``α = max_{i=1..v} P[v-i <= Binomial(r, q) < v] / i`` (``α = 0`` when
        ``v = 0``). Small values reject the claim.

    Raises
    ------
    TypeError
        If a count is not an int.
    ValueError
        If the counts are inconsistent or ε, δ are out of range.

    Notes
    -----
    The (ε, δ) p-value of Steinke, Nasr and Jagielski (NeurIPS 2023),
    https://arxiv.org/abs/2305.08846, exactly as jax_privacy's
    ``auditing._one_run_p_value`` computes it (δ enters once, as ``2·m·δ·α``). For δ = 0 it is the binomial tail alone. The
    bound holds for any guesser whose guesses depend on the inclusions only
    through the trained model.
    """
    _check_count("m", m, 1)
    _check_count("r", r, 0)
    _check_count("v", v, 0)
    if not v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if isinstance(epsilon, bool) or not (math.isfinite(epsilon) and epsilon >= 0.0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    _check_delta(delta)
    return _p_value(m, r, v, epsilon, delta)


def _p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    q = float(scipy.special.expit(epsilon))
    beta = float(scipy.stats.binom.sf(v - 1, r, q))  # P[B >= v]
    if delta == 0.0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    # P[v-i <= B < v] = P[B >= v-i] - P[B >= v], for i = 1..v.   # (v,)
    window = scipy.stats.binom.sf(v - i - 1, r, q) - beta
    alpha = float(np.max(window / i, initial=0.0))
    return min(beta + 2.0 * m * delta * alpha, 1.0)


def one_run_epsilon_lb(
    m: int, r: int, v: int, delta: float, confidence: float = 0.95
) -> float:
    """Largest ε whose (ε, δ)-DP claim is rejected at the given confidence.

    Parameters
    ----------
    m : int
        Number of canaries.
    r : int
        Number of guesses.
    v : int
        Number of correct guesses.
    delta : float
        δ of the claims tested, in [0, 1).
    confidence : float, default 0.95
        Confidence of the bound, in (0, 1): a claim is rejected when its p-value is
        at most ``1 - confidence``.

    Returns
    -------
    float
        ε_LB >= 0, to within 1e-6; 0.0 when even the claim ε = 0 is not rejected.

    Raises
    ------
    TypeError
        If a count is not an int.
    ValueError
        If the counts are inconsistent or δ, confidence are out of range.

    Notes
    -----
    :func:`one_run_p_value` is non-decreasing in ε whenever ``2·m·δ <= 1`` (each
    term of the max is then a non-negative mix of binomial tails, all increasing in
    q); in practice it is monotone far beyond that. The search brackets the crossing
    by doubling from ε = 1 and then bisects, keeping ``p(lo) <= 1 - confidence <
    p(hi)``, so the result is always an ε whose claim is rejected. As in
    jax_privacy, a δ = 0 p-value above the level at ε = 0 stops early: a positive δ
    only adds to the p-value.
    """
    _check_unit_open("confidence", confidence)
    _check_delta(delta)
    level = 1.0 - confidence
    if one_run_p_value(m, r, v, 0.0, 0.0) > level:
        return 0.0

    def rejected(epsilon: float) -> bool:
        return _p_value(m, r, v, epsilon, delta) <= level

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        # Ends: as ε -> ∞, q -> 1 and P[B >= v] -> 1 (v <= r), so p -> 1.
        lo, hi = hi, 2.0 * hi
    while hi - lo > _EPSILON_TOL:
        mid = 0.5 * (lo + hi)
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True, slots=True)
class OneRunCandidate:
    """One pre-registered choice of guess counts and the bound it gives.

    ``k_plus`` canaries with the top scores are guessed "in", ``k_minus`` with the
    bottom scores "out"; ``r = k_plus + k_minus`` guesses, ``v`` of them correct.
    ``epsilon_lb`` is at the audit's per-candidate (Bonferroni) confidence.
    """

    k_plus: int
    k_minus: int
    r: int
    v: int
    epsilon_lb: float

    def to_dict(self) -> dict[str, int | float]:
        """JSON-able form."""
        return {
            "k_plus": self.k_plus,
            "k_minus": self.k_minus,
            "r": self.r,
            "v": self.v,
            "epsilon_lb": self.epsilon_lb,
        }


@dataclass(frozen=True, slots=True)
class OneRunAudit:
    """Result of a one-run audit (Steinke, Nasr, Jagielski 2023).

    Attributes
    ----------
    m : int
        Number of canaries.
    k_plus, k_minus : int
        Guess counts of the candidate that gave the largest bound (the first such
        candidate on a tie).
    r, v : int
        Guesses and correct guesses of that candidate.
    epsilon_lb : float
        Lower bound on ε at ``delta``, valid at ``confidence`` (the max over
        ``candidates``, each bounded at ``per_candidate_confidence``).
    confidence : float
        Confidence of ``epsilon_lb``.
    per_candidate_confidence : float
        ``1 - (1 - confidence) / len(candidates)``: the Bonferroni-corrected level.
    delta : float
        δ of the claims tested.
    candidates : tuple of OneRunCandidate
        Every pre-registered guess-count choice, in the order evaluated.
    """

    m: int
    k_plus: int
    k_minus: int
    r: int
    v: int
    epsilon_lb: float
    confidence: float
    per_candidate_confidence: float
    delta: float
    candidates: tuple[OneRunCandidate, ...]

    def to_dict(self) -> dict[str, int | float | list[dict[str, int | float]]]:
        """JSON-able form; ``candidates`` becomes a list of dicts."""
        return {
            "m": self.m,
            "k_plus": self.k_plus,
            "k_minus": self.k_minus,
            "r": self.r,
            "v": self.v,
            "epsilon_lb": self.epsilon_lb,
            "confidence": self.confidence,
            "per_candidate_confidence": self.per_candidate_confidence,
            "delta": self.delta,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def default_guess_counts(m: int) -> list[tuple[int, int]]:
    """Return the fixed grid of symmetric guess counts used when none are given.

    Parameters
    ----------
    m : int
        Number of canaries (>= 2).

    Returns
    -------
    list of (int, int)
        ``(k, k)`` for ``k = max(1, ⌊f·⌊m/2⌋⌋)``, f in
        :data:`DEFAULT_GUESS_FRACTIONS`, deduplicated, in increasing order.

    Raises
    ------
    TypeError
        If ``m`` is not an int.
    ValueError
        If ``m < 2``.
    """
    _check_count("m", m, 2)
    half = m // 2
    ks = sorted({max(1, math.floor(f * half)) for f in DEFAULT_GUESS_FRACTIONS})
    return [(k, k) for k in ks]


def one_run_audit(
    scores: npt.ArrayLike,
    included: npt.ArrayLike,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
    rng: np.random.Generator | None = None,
) -> OneRunAudit:
    """One-run ε lower bound from canary scores, over pre-registered guess counts.

    Parameters
    ----------
    scores : array_like, shape (m,)
        Finite attack score per canary; higher means "more likely included". The
        scores must be computed from the trained model alone.
    included : array_like of bool, shape (m,)
        Whether each canary was included (each independently with probability ½).
        It is used only to count correct guesses.
    delta : float
        δ of the claims tested, in [0, 1). Keep ``2·m·δ`` well below
        ``1 - confidence`` or the δ term dominates the bound.
    confidence : float, default 0.95
        Confidence of the reported bound, in (0, 1).
    guess_counts : sequence of (int, int), optional
        Candidate ``(k_plus, k_minus)`` pairs, fixed before looking at the scores.
        Default: :func:`default_guess_counts` (symmetric, 1%…50% of ⌊m/2⌋).
    rng : numpy.random.Generator, optional
        Breaks ties between equal scores. Default ``np.random.default_rng(0)``, so
        results are reproducible.

    Returns
    -------
    OneRunAudit
        The largest bound over the candidates and the per-candidate table.

    Raises
    ------
    ValueError
        On shape mismatch, non-finite scores, non-boolean ``included``, or guess
        counts that are negative, all zero or exceed ``m`` in total.

    Notes
    -----
    Each candidate guesses "in" for the ``k_plus`` highest scores and "out" for the
    ``k_minus`` lowest, abstaining on the rest (Steinke et al. 2023).
    Ties are ordered by an independent random key, never by ``included``. Choosing
    the guess counts after seeing the outcome would invalidate the bound, so all K
    candidates are evaluated, each at confidence ``1 - (1 - confidence)/K``, and the
    largest is reported: by the union bound it holds at ``confidence``. jax_privacy
    instead guesses "in" only (``k_minus = 0``) and applies Bonferroni over every
    distinct score threshold.
    """
    score_arr = np.asarray(scores, dtype=np.float64)
    included_arr = np.asarray(included)
    if score_arr.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {score_arr.shape}")
    if included_arr.shape != score_arr.shape:
        raise ValueError(
            f"included has shape {included_arr.shape}, scores {score_arr.shape}: "
            "pass one inclusion flag per canary"
        )
    if included_arr.dtype != np.bool_:
        raise ValueError(
            f"included must be a bool array, got dtype {included_arr.dtype}"
        )
    if not np.all(np.isfinite(score_arr)):
        raise ValueError(
            "scores must be finite: replace NaN/inf scores before auditing"
        )
    _check_unit_open("confidence", confidence)
    _check_delta(delta)
    m = int(score_arr.size)
    if guess_counts is None:
        candidates_counts = default_guess_counts(m)
    else:
        candidates_counts = [(int(kp), int(km)) for kp, km in guess_counts]
        if not candidates_counts:
            raise ValueError(
                "guess_counts is empty: pass at least one (k_plus, k_minus)"
            )
        for kp, km in candidates_counts:
            if kp < 0 or km < 0 or kp + km == 0 or kp + km > m:
                raise ValueError(
                    f"guess counts (k_plus={kp}, k_minus={km}) must be >= 0 with "
                    f"1 <= k_plus + k_minus <= m={m}"
                )

    generator = np.random.default_rng(0) if rng is None else rng
    tie_keys = generator.random(m)
    # Indices by decreasing score, ties in random order.   # (m,)
    order = np.lexsort((tie_keys, -score_arr))
    ranked_in = included_arr[order]
    # correct_top[k]: included among the top k; correct_bottom[k]: excluded among
    # the bottom k.   # (m + 1,)
    correct_top = np.concatenate([[0], np.cumsum(ranked_in)])
    correct_bottom = np.concatenate([[0], np.cumsum(~ranked_in[::-1])])

    num_candidates = len(candidates_counts)
    per_candidate_confidence = 1.0 - (1.0 - confidence) / num_candidates
    table: list[OneRunCandidate] = []
    for kp, km in candidates_counts:
        v = int(correct_top[kp] + correct_bottom[km])
        bound = one_run_epsilon_lb(m, kp + km, v, delta, per_candidate_confidence)
        table.append(OneRunCandidate(kp, km, kp + km, v, bound))
    best = max(table, key=lambda c: c.epsilon_lb)  # first maximiser on ties
    return OneRunAudit(
        m=m,
        k_plus=best.k_plus,
        k_minus=best.k_minus,
        r=best.r,
        v=best.v,
        epsilon_lb=best.epsilon_lb,
        confidence=confidence,
        per_candidate_confidence=per_candidate_confidence,
        delta=delta,
        candidates=tuple(table),
    )


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
    _check_count("dim", dim, 2)
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
