"""Quantisation into Z_2^b: exact at the grid's ends, unbiased rounding, the n·Δ error bound, no overflow."""

import numpy as np
import pytest

from common.secagg.quantize import QuantisationError, QuantSpec, dequantise_sum, quantise, range_for


def _sum(spec, vectors, rng):
    total = np.zeros(vectors[0].size, dtype=spec.dtype)
    for v in vectors:
        total += quantise(v, spec, rng).values
    return dequantise_sum(total, spec, len(vectors))


def test_levels_and_step_by_hand():
    spec = QuantSpec(clip_range=2.0, modulus_bits=32, max_silos=5)
    assert spec.modulus == 2**32
    assert spec.levels == (2**32 - 1) // 5 == 858_993_459
    assert spec.step == pytest.approx(4.0 / 858_993_459)
    assert spec.sum_error_bound(3) == pytest.approx(3 * 4.0 / 858_993_459)
    wide = QuantSpec(clip_range=1.0, modulus_bits=64, max_silos=20)
    assert wide.levels == 2**53 // 20 and wide.dtype is np.uint64  # float64-exact sums, far below 2^64


def test_grid_ends_are_exact_and_sum_by_hand(rng):
    spec = QuantSpec(1.0, 32, 3)
    x1, x2, x3 = np.array([1.0, -1.0, 1.0]), np.array([1.0, 1.0, -1.0]), np.array([-1.0, -1.0, -1.0])
    q = quantise(x1, spec, rng)
    assert q.values.tolist() == [spec.levels, 0, spec.levels] and q.clipped == 0
    np.testing.assert_allclose(_sum(spec, [x1, x2, x3], rng), [1.0, -1.0, -1.0], atol=1e-12)


def test_stochastic_rounding_picks_a_neighbour_with_the_right_probability():
    spec = QuantSpec(1.0, 32, 4)
    x = np.full(200_000, 0.3)
    scaled = (0.3 + 1.0) * spec.levels / 2.0
    k = quantise(x, spec, np.random.default_rng(7)).values.astype(np.float64)
    assert set(np.unique(k)) == {np.floor(scaled), np.floor(scaled) + 1}
    p_up = scaled - np.floor(scaled)
    # binomial std of the fraction rounded up: sqrt(p(1-p)/n) <= 0.0012; allow 5 of them
    assert abs(np.mean(k == np.floor(scaled) + 1) - p_up) < 0.006


def test_rounding_is_seeded(rng):
    spec = QuantSpec(1.0, 32, 4)
    x = rng.uniform(-1, 1, 1000)
    a = quantise(x, spec, np.random.default_rng(3)).values
    b = quantise(x, spec, np.random.default_rng(3)).values
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bits", [32, 64])
def test_random_sums_stay_within_the_stated_bound(bits):
    rng = np.random.default_rng(11)
    spec = QuantSpec(0.5, bits, 5)
    vectors = [rng.uniform(-0.5, 0.5, 20_000) for _ in range(5)]
    err = np.abs(_sum(spec, vectors, rng) - np.sum(vectors, axis=0))
    assert err.max() < spec.sum_error_bound(5)
    assert err.max() > 0.5 * spec.step  # the rounding is real: the check above could fail


def test_clipping_is_counted_and_applied(rng):
    spec = QuantSpec(1.0, 32, 2)
    q = quantise(np.array([3.0, -2.0, 0.5]), spec, rng)
    assert q.clipped == 2
    total = dequantise_sum(q.values, spec, 1)
    assert total[0] == pytest.approx(1.0) and total[1] == pytest.approx(-1.0)


def test_no_overflow_even_when_every_silo_sits_at_plus_r(rng):
    spec = QuantSpec(1.0, 32, 20)
    vectors = [np.ones(10) for _ in range(20)]
    total = np.zeros(10, dtype=np.uint32)
    for v in vectors:
        total += quantise(v, spec, rng).values
    assert int(total.max()) == 20 * spec.levels <= 2**32 - 1
    np.testing.assert_allclose(dequantise_sum(total, spec, 20), 20.0, atol=1e-9)


def test_a_sum_that_cannot_come_from_n_vectors_is_refused(rng):
    spec = QuantSpec(1.0, 32, 3)
    total = quantise(np.ones(4), spec, rng).values * 2
    with pytest.raises(QuantisationError, match="does not come from that many"):
        dequantise_sum(total, spec, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_range": 0.0, "modulus_bits": 32, "max_silos": 3}, "clip_range"),
        ({"clip_range": 1.0, "modulus_bits": 16, "max_silos": 3}, "modulus_bits"),
        ({"clip_range": 1.0, "modulus_bits": 32, "max_silos": 0}, "max_silos"),
    ],
)
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(QuantisationError, match=match):
        QuantSpec(**kwargs)


def test_nan_input_is_refused(rng):
    with pytest.raises(QuantisationError, match="NaN"):
        quantise(np.array([0.0, np.nan]), QuantSpec(1.0, 32, 2), rng)


def test_range_for_by_hand():
    # one coordinate, failure probability 0.05: z = 1.95996 (two-sided 95%)
    assert range_for(1.0, 2.0, 1, 0.05) == pytest.approx(1.0 + 2.0 * 1.959964, rel=1e-5)
    assert range_for(0.0, 1.0, 1000, 1e-9) > range_for(0.0, 1.0, 1, 1e-9)
