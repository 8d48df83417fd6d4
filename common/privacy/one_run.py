"""One-run audit: a lower bound on ε from canaries in a single training run.

:func:`one_run_audit` / :func:`one_run_epsilon_lb` give a *lower bound* on ε that
holds with the stated confidence (Steinke, Nasr and Jagielski, "Privacy auditing
with one (1) training run", NeurIPS 2023, https://arxiv.org/abs/2305.08846). If a
run claims (ε, δ)-DP and the bound exceeds that ε, the claim (or the code) is wrong.
One-run bounds are loose: use them as a bug detector, not as a tight estimate.

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
import scipy.special
import scipy.stats

from common.privacy._checks import check_count, check_delta, check_unit_open

# Symmetric guess counts k+ = k- = max(1, ⌊f·⌊m/2⌋⌋) for each fraction f: the grid is
# fixed before the scores are seen, so a Bonferroni correction over it is valid.
DEFAULT_GUESS_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
# Bisection stops when the bracket on ε is this narrow.
_EPSILON_TOL = 1e-6


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
    ``auditing._one_run_p_value`` computes it (δ enters once, as ``2·m·δ·α``).
    For δ = 0 it is the binomial tail alone. The bound holds for any guesser whose
    guesses depend on the inclusions only through the trained model.
    """
    check_count("m", m, 1)
    check_count("r", r, 0)
    check_count("v", v, 0)
    if not v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if isinstance(epsilon, bool) or not (math.isfinite(epsilon) and epsilon >= 0.0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    check_delta(delta)
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
    check_unit_open("confidence", confidence)
    check_delta(delta)
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
    check_count("m", m, 2)
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
    check_unit_open("confidence", confidence)
    check_delta(delta)
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
