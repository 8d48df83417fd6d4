"""One-run audit: p-value, ε lower bound and the audit over guess counts."""

import itertools
import json
import math

import numpy as np
import pytest

from common.privacy.one_run import (
    DEFAULT_GUESS_FRACTIONS,
    default_guess_counts,
    one_run_audit,
    one_run_epsilon_lb,
    one_run_p_value,
)

DELTA = 1e-5


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
