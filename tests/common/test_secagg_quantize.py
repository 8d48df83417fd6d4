"""Quantisation into Z_2^32: the grid by hand, the Lemma (the release is a function of the sum), the bound, the range."""

import numpy as np
import pytest

from common.secagg.quantize import QuantisationError, QuantSpec, dequantise_sum, quantise, range_for


def zero_sum_dithers(num_silos, length, rng):
    """The protocol's dither structure: d_ab uniform on [0, 1) per pair, +d for the larger id."""
    dithers = np.zeros((num_silos, length))
    for a in range(num_silos):
        for b in range(a):
            d = rng.random(length)
            dithers[a] += d
            dithers[b] -= d
    return dithers


def secure_sum(spec, vectors, dithers, offset=0.0):
    total = np.zeros(vectors[0].size, dtype=spec.dtype)
    for v, u in zip(vectors, dithers, strict=True):
        total += quantise(v, spec, u).values
    return dequantise_sum(total, spec, len(vectors), offset)


def test_grid_by_hand():
    spec = QuantSpec(clip_range=2.0, modulus_bits=32, max_silos=5)
    assert spec.modulus == 2**32 and spec.dtype is np.uint32
    assert spec.sum_range == 10.0 and spec.steps == 2**30
    assert spec.step == 10.0 / 2**30
    assert spec.sum_error_bound(3) == pytest.approx(3 * (10.0 / 2**30) * (0.5 + 2**-20))


def test_grid_points_are_exact_and_negative_values_wrap(rng):
    spec = QuantSpec(1.0, 32, 3)
    x1, x2 = np.array([3 * spec.step, -5 * spec.step]), np.array([-7 * spec.step, 11 * spec.step])
    q = quantise(x1, spec)
    assert q.values.tolist() == [3, 2**32 - 5] and q.beyond == 0  # −5 mod 2^32
    np.testing.assert_array_equal(secure_sum(spec, [x1, x2], np.zeros((2, 2))), [-4 * spec.step, 6 * spec.step])


def irwin_hall_floor_law(b, n):
    """P(⌊b − V⌋ = k), V the sum of n − 1 iid U[0, 1), for n = 3: V has density v on [0,1], 2 − v on [1,2]."""
    assert n == 3

    def cdf(v):  # P(V <= v)
        v = min(max(v, 0.0), 2.0)
        return v * v / 2 if v <= 1 else 1 - (2 - v) ** 2 / 2

    ks = range(int(np.floor(b - 2)), int(np.floor(b)) + 1)
    return {k: cdf(b - k) - cdf(b - k - 1) for k in ks}


@pytest.mark.parametrize("split", [(0.3, 0.3, 0.3), (0.9, 0.0, 0.0), (-2.1, 1.5, 1.5)])
def test_the_release_depends_on_the_silos_vectors_only_through_their_sum(rng, split):
    # Lemma (common/secagg/quantize.py): Σ ⌊y_s/Δ + u_s + ½⌋ = ⌊B − V⌋, B = Σ y_s/Δ + n/2, V ~ Irwin-Hall(n − 1).
    # Three silos whose values (in grid steps) sum to 0.9: B = 2.4, so by hand
    # P(K = 2) = P(V ≤ 0.4) = 0.08, P(K = 0) = P(V > 1.4) = 0.6²/2 = 0.18, P(K = 1) = 0.74.
    spec = QuantSpec(1.0, 32, 3)
    d = 200_000  # every coordinate is one draw of the dithers
    vectors = [np.full(d, s * spec.step) for s in split]
    k = np.rint(secure_sum(spec, vectors, zero_sum_dithers(3, d, rng)) / spec.step)
    law = irwin_hall_floor_law(2.4, 3)
    assert law == pytest.approx({0: 0.18, 1: 0.74, 2: 0.08})
    assert set(np.unique(k)) <= set(law)
    for value, p in law.items():  # binomial std of a frequency <= 0.0012 at d = 2e5; allow 5 of them
        assert abs(np.mean(k == value) - p) < 0.006, (split, value)
    assert abs(k.mean() - 0.9) < 0.005  # unbiased


def test_without_the_zero_sum_dither_the_release_depends_on_the_split(rng):
    # the check above can fail: independent stochastic rounding (each silo rounds up with
    # probability equal to its fraction) gives split (0.9, 0, 0) K = 1 w.p. 0.9, split (0.3, 0.3, 0.3)
    # K = 0 w.p. 0.7³ = 0.343 — neither is the law above, and they differ from each other
    d = 200_000
    k_even = sum((rng.random(d) < 0.3).astype(int) for _ in range(3))
    k_one = (rng.random(d) < 0.9).astype(int)
    assert abs(np.mean(k_even == 0) - 0.343) < 0.006 and abs(np.mean(k_one == 0) - 0.1) < 0.006


def test_random_sums_stay_within_the_stated_bound_and_are_unbiased():
    rng = np.random.default_rng(11)
    spec = QuantSpec(0.5, 32, 5)
    d = 50_000
    vectors = [rng.uniform(-0.5, 0.5, d) for _ in range(5)]
    err = secure_sum(spec, vectors, zero_sum_dithers(5, d, rng)) - np.sum(vectors, axis=0)
    assert np.abs(err).max() < spec.sum_error_bound(5)
    assert np.abs(err).max() > 1.5 * spec.step  # the rounding is real: the check above could fail
    # mean 0: the error is within n/2 steps, so its std is < 2.5 steps; 5 standard errors
    assert abs(err.mean()) < 5 * 2.5 * spec.step / np.sqrt(d)


def test_a_known_dither_is_subtracted_as_the_offset(rng):
    # a silo that dropped out after masking: its pairs' dithers stay in the others' vectors
    spec = QuantSpec(1.0, 32, 3)
    d = 50_000
    dithers = zero_sum_dithers(3, d, rng)
    vectors = [rng.uniform(-1, 1, d) for _ in range(2)]  # silo 3 dropped; silos 1 and 2 keep its pairs
    offset = dithers[0] + dithers[1]  # = −dithers[2]: what the server reconstructs
    err = secure_sum(spec, vectors, dithers[:2], offset) - np.sum(vectors, axis=0)
    assert np.abs(err).max() < spec.sum_error_bound(2)
    biased = secure_sum(spec, vectors, dithers[:2]) - np.sum(vectors, axis=0)
    assert abs(biased.mean()) > 10 * abs(err.mean())  # without the offset: off by the dropped pairs' mean


def test_a_silo_beyond_r_is_counted_not_clipped():
    spec = QuantSpec(1.0, 32, 2)
    q = quantise(np.array([1.5, -1.2, 0.5]), spec)  # beyond r = 1, within S·r = 2
    assert q.beyond == 2
    np.testing.assert_allclose(dequantise_sum(q.values, spec, 1), [1.5, -1.2, 0.5], atol=spec.step)


def test_a_sum_beyond_s_times_r_is_refused_not_wrapped():
    spec = QuantSpec(1.0, 32, 2)
    total = quantise(np.array([2.5, 0.0]), spec).values  # beyond S·r = 2, inside the guard band
    with pytest.raises(QuantisationError, match=r"1 of 2 coordinates lie beyond ±S·r = ±2"):
        dequantise_sum(total, spec, 1)


def test_a_sum_whose_masks_were_not_removed_is_refused(rng):
    spec = QuantSpec(1.0, 32, 3)
    total = rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32)  # uniform in Z_M
    with pytest.raises(QuantisationError, match="masks not removed"):
        dequantise_sum(total, spec, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_range": 0.0, "modulus_bits": 32, "max_silos": 3}, "clip_range"),
        ({"clip_range": 1.0, "modulus_bits": 64, "max_silos": 3}, "modulus_bits: must be 32"),
        ({"clip_range": 1.0, "modulus_bits": 32, "max_silos": 0}, "max_silos"),
    ],
)
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(QuantisationError, match=match):
        QuantSpec(**kwargs)


def test_bad_vectors_are_refused():
    spec = QuantSpec(1.0, 32, 2)
    with pytest.raises(QuantisationError, match="NaN"):
        quantise(np.array([0.0, np.nan]), spec)
    with pytest.raises(QuantisationError, match="beyond 2\\^52 grid steps"):
        quantise(np.array([0.0, 1e10]), spec)
    with pytest.raises(QuantisationError, match="dither: shape"):
        quantise(np.zeros(3), spec, np.zeros(2))


def test_range_for_by_hand():
    # one coordinate, failure probability 0.05: z = 1.95996 (two-sided 95%)
    assert range_for(1.0, 2.0, 1, 0.05) == pytest.approx(1.0 + 2.0 * 1.959964, rel=1e-5)
    assert range_for(0.0, 1.0, 1000, 1e-9) > range_for(0.0, 1.0, 1, 1e-9)
