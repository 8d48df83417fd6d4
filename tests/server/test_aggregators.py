"""Tests of server.aggregators: hand-computed values, Flower parity, properties and every ValueError."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server import aggregators
from server.aggregators import (
    coordinate_median,
    krum_scores,
    multi_krum,
    norm_bounded_mean,
    sensitivity,
    trimmed_mean,
    weighted_mean,
)

Update = dict[str, np.ndarray]


def make_update(item: list[float], bias: list[float]) -> Update:
    return {"item": np.array(item, dtype=np.float64), "bias": np.array(bias, dtype=np.float64)}


def five_silos_one_outlier() -> list[Update]:
    """Four honest silos and silo 4 = 1000 x silo 3.

    Flattened (item0, item1, bias):
      s0 = (1, 2, 0)   s1 = (2, 3, 1)   s2 = (3, 1, 2)   s3 = (2, 2, 1)   s4 = (2000, 2000, 1000)
    """
    return [
        make_update([1, 2], [0]),
        make_update([2, 3], [1]),
        make_update([3, 1], [2]),
        make_update([2, 2], [1]),
        make_update([2000, 2000], [1000]),
    ]


def assert_updates_close(actual: Update, expected: Update) -> None:
    assert list(actual) == list(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-12, atol=1e-12)
        assert actual[name].dtype == np.float64


def to_flower_contents(updates: list[Update]) -> list[RecordDict]:
    """The reply contents Flower's select_multikrum reads: one ArrayRecord (+ weights)."""
    return [
        RecordDict(
            {
                "arrays": ArrayRecord({name: Array(value) for name, value in update.items()}),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )
        for update in updates
    ]


def flower_multikrum_indices(updates: list[Update], num_malicious: int, num_selected: int) -> list[int]:
    contents = to_flower_contents(updates)
    chosen = select_multikrum(contents, num_malicious_nodes=num_malicious, num_nodes_to_select=num_selected)
    return [next(i for i, c in enumerate(contents) if c is picked) for picked in chosen]


def test_weighted_mean_is_pulled_by_the_outlier() -> None:
    # Arrange
    updates = five_silos_one_outlier()

    # Act
    result = weighted_mean(updates, [1, 1, 1, 1, 1])

    # Assert: item0 = (1+2+3+2+2000)/5 = 2008/5 = 401.6; item1 = (2+3+1+2+2000)/5 = 401.6;
    # bias = (0+1+2+1+1000)/5 = 1004/5 = 200.8
    assert_updates_close(result, make_update([401.6, 401.6], [200.8]))


def test_weighted_mean_uses_weight_ratios() -> None:
    # Arrange
    updates = [make_update([0, 4], [1]), make_update([3, 0], [1]), make_update([6, 8], [4])]

    # Act
    result = weighted_mean(updates, [2.0, 1.0, 1.0])
    scaled = weighted_mean(updates, [20.0, 10.0, 10.0])

    # Assert: total weight 4; item0 = (2*0 + 3 + 6)/4 = 9/4 = 2.25; item1 = (2*4 + 0 + 8)/4 = 4;
    # bias = (2*1 + 1 + 4)/4 = 7/4 = 1.75
    assert_updates_close(result, make_update([2.25, 4.0], [1.75]))
    assert_updates_close(scaled, result)


def test_weighted_mean_zero_weight_drops_an_update() -> None:
    # Arrange
    updates = [make_update([1, 1], [1]), make_update([1e6, -1e6], [1e6])]

    # Act
    result = weighted_mean(updates, [3, 0])

    # Assert: the zero-weight silo does not contribute: (3*x0 + 0*x1)/3 = x0
    assert_updates_close(result, make_update([1, 1], [1]))


def test_weighted_mean_computes_float32_input_in_float64() -> None:
    # Arrange: 0.1 is not exact in float32; the mean of one update is that update, widened
    updates = [{"w": np.array([0.1], dtype=np.float32)}]

    # Act
    result = weighted_mean(updates, [1])

    # Assert
    assert result["w"].dtype == np.float64
    assert result["w"][0] == float(np.float32(0.1))


def test_median_ignores_the_outlier() -> None:
    # Arrange
    updates = five_silos_one_outlier()

    # Act
    result = coordinate_median(updates)

    # Assert: item0 sorted {1,2,2,3,2000} -> 2; item1 {1,2,2,3,2000} -> 2; bias {0,1,1,2,1000} -> 1
    assert_updates_close(result, make_update([2, 2], [1]))


def test_median_odd_count_is_the_middle_value() -> None:
    # Arrange
    updates = [{"w": np.array([[4.0, -1.0]])}, {"w": np.array([[1.0, 5.0]])}, {"w": np.array([[2.0, 0.0]])}]

    # Act
    result = coordinate_median(updates)

    # Assert: column 0 {1, 2, 4} -> 2; column 1 {-1, 0, 5} -> 0; shape (1, 2) kept
    assert_updates_close(result, {"w": np.array([[2.0, 0.0]])})


def test_median_even_count_is_the_mean_of_the_two_middle_values() -> None:
    # Arrange
    updates = [
        {"w": np.array([1.0, 7.0])},
        {"w": np.array([10.0, 1.0])},
        {"w": np.array([2.0, 3.0])},
        {"w": np.array([4.0, 5.0])},
    ]

    # Act
    result = coordinate_median(updates)

    # Assert: column 0 {1, 2, 4, 10} -> (2+4)/2 = 3; column 1 {1, 3, 5, 7} -> (3+5)/2 = 4
    assert_updates_close(result, {"w": np.array([3.0, 4.0])})


def test_trimmed_mean_ignores_the_outlier() -> None:
    # Arrange
    updates = five_silos_one_outlier()

    # Act
    result = trimmed_mean(updates, beta=0.2)

    # Assert: cut = floor(0.2*5) = 1 per side; item0 {1,[2,2,3],2000} -> 7/3; item1 {1,[2,2,3],2000} -> 7/3;
    # bias {0,[1,1,2],1000} -> 4/3
    assert_updates_close(result, make_update([7 / 3, 7 / 3], [4 / 3]))


def test_trimmed_mean_cut_rounds_down() -> None:
    # Arrange: beta = 0.3 with n = 5 -> floor(1.5) = 1 per side, not 2
    updates = [{"w": np.array([v])} for v in (0.0, 10.0, 20.0, 30.0, 100.0)]

    # Act
    result = trimmed_mean(updates, beta=0.3)

    # Assert: keep {10, 20, 30} -> 20
    assert_updates_close(result, {"w": np.array([20.0])})


def test_trimmed_mean_with_beta_zero_is_the_mean() -> None:
    # Arrange
    updates = five_silos_one_outlier()

    # Act
    trimmed = trimmed_mean(updates, beta=0.0)
    mean = weighted_mean(updates, [1, 1, 1, 1, 1])

    # Assert
    assert_updates_close(trimmed, mean)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.25, 0.3, 0.45, 0.49])
@pytest.mark.parametrize("n", [1, 2, 5, 7, 10])
def test_trimmed_mean_matches_flower_trim_mean(beta: float, n: int, rng: np.random.Generator) -> None:
    # Arrange
    updates = [{"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4)} for _ in range(n)]

    # Act
    result = trimmed_mean(updates, beta)

    # Assert: Flower's FedTrimmedAvg applies trim_mean to each parameter stacked over silos
    for name in ("a", "b"):
        expected = trim_mean(np.stack([u[name] for u in updates]), beta)
        np.testing.assert_allclose(result[name], expected, rtol=1e-12, atol=1e-15)


def test_trimmed_mean_rejects_nan_that_flower_would_trim_silently() -> None:
    # Arrange: Flower's trim_mean sorts NaN last, so with a cut of 1 the NaN silo is dropped:
    # {1, [2, 3, 4], nan} -> 3
    updates = [{"w": np.array([v])} for v in (1.0, 2.0, math.nan, 3.0, 4.0)]
    flower = trim_mean(np.stack([u["w"] for u in updates]), 0.2)

    # Act / Assert
    np.testing.assert_array_equal(flower, [3.0])
    with pytest.raises(ValueError, match=r"updates\[2\]\['w'\] holds NaN or inf"):
        trimmed_mean(updates, beta=0.2)


def test_krum_scores_by_hand() -> None:
    # Arrange: f = 1, n = 5 >= 2*1 + 3, so each score sums the n - f - 2 = 2 nearest squared distances.
    # d01 = 1+1+1 = 3, d02 = 4+1+4 = 9, d03 = 1+0+1 = 2, d12 = 1+4+1 = 6, d13 = 0+1+0 = 1, d23 = 1+1+1 = 3
    # d14 = 1998² + 1997² + 999² = 3992004 + 3988009 + 998001 = 8978014
    # d24 = 1997² + 1999² + 998² = 3988009 + 3996001 + 996004 = 8980014
    updates = five_silos_one_outlier()

    # Act
    scores = krum_scores(updates, num_malicious=1)

    # Assert: s0: 2+3 = 5; s1: 1+3 = 4; s2: 3+6 = 9; s3: 1+2 = 3; s4: d14 + d24 = 17958028
    np.testing.assert_array_equal(scores, [5.0, 4.0, 9.0, 3.0, 17958028.0])


def test_krum_selects_the_most_central_update() -> None:
    # Arrange
    updates = five_silos_one_outlier()

    # Act
    result, selected = multi_krum(updates, num_malicious=1, num_selected=1)

    # Assert: lowest score is s3 (3), and Krum returns s3 itself
    assert selected == [3]
    assert_updates_close(result, make_update([2, 2], [1]))


def test_multi_krum_with_n_minus_f_drops_the_outlier() -> None:
    # Arrange
    updates = five_silos_one_outlier()

    # Act
    result, selected = multi_krum(updates, num_malicious=1, num_selected=5 - 1)

    # Assert: by score s3 (3), s1 (4), s0 (5), s2 (9); mean of the honest four:
    # item0 = (1+2+3+2)/4 = 2; item1 = (2+3+1+2)/4 = 2; bias = (0+1+2+1)/4 = 1
    assert selected == [3, 1, 0, 2]
    assert_updates_close(result, make_update([2, 2], [1]))


def test_multi_krum_selecting_all_is_the_mean() -> None:
    # Arrange
    updates = five_silos_one_outlier()

    # Act
    result, selected = multi_krum(updates, num_malicious=1, num_selected=5)

    # Assert
    assert selected == [3, 1, 0, 2, 4]
    assert_updates_close(result, weighted_mean(updates, [1] * 5))


def test_multi_krum_breaks_ties_by_index() -> None:
    # Arrange: three identical updates all score 0 (f = 0 -> 1 nearest neighbour, at distance 0)
    updates = [{"w": np.array([1.0])} for _ in range(3)]

    # Act
    _, selected = multi_krum(updates, num_malicious=0, num_selected=3)

    # Assert
    assert selected == [0, 1, 2]


@pytest.mark.parametrize("num_selected", [1, 2, 4, 5])
def test_krum_selection_matches_flower_on_the_outlier_example(num_selected: int) -> None:
    # Arrange
    updates = five_silos_one_outlier()

    # Act
    _, selected = multi_krum(updates, num_malicious=1, num_selected=num_selected)

    # Assert
    assert selected == flower_multikrum_indices(updates, num_malicious=1, num_selected=num_selected)


@pytest.mark.parametrize(("n", "num_malicious"), [(3, 0), (5, 1), (7, 2), (12, 3)])
def test_krum_selection_matches_flower_on_random_updates(n: int, num_malicious: int, rng: np.random.Generator) -> None:
    # Arrange: continuous random values, so no two scores tie
    updates = [{"emb": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)} for _ in range(n)]
    updates[0] = {name: 50.0 * value for name, value in updates[0].items()}  # one far-off silo

    # Act
    _, krum = multi_krum(updates, num_malicious, num_selected=1)
    _, multi = multi_krum(updates, num_malicious, num_selected=n - num_malicious)

    # Assert
    assert krum == flower_multikrum_indices(updates, num_malicious, 1)
    assert multi == flower_multikrum_indices(updates, num_malicious, n - num_malicious)
    assert krum != [0]


def test_krum_distance_is_over_the_whole_update() -> None:
    # Arrange: per parameter, silo 2 looks central in "a" alone, but not over the whole update.
    # Flattened (a, b): s0 = (0, 0), s1 = (1, 0), s2 = (0.5, 10); f = 0 -> 1 nearest neighbour.
    # d01 = 1, d02 = 0.25 + 100 = 100.25, d12 = 0.25 + 100 = 100.25
    updates = [
        {"a": np.array([0.0]), "b": np.array([0.0])},
        {"a": np.array([1.0]), "b": np.array([0.0])},
        {"a": np.array([0.5]), "b": np.array([10.0])},
    ]

    # Act
    scores = krum_scores(updates, num_malicious=0)

    # Assert: s0: 1; s1: 1; s2: 100.25
    np.testing.assert_array_equal(scores, [1.0, 1.0, 100.25])


def test_norm_bounded_mean_scales_the_huge_update_as_a_whole() -> None:
    # Arrange: norms over both parameters: |(3, 0, 4)| = 5, |(0, 0, 1)| = 1, |(3000, 0, 4000)| = 5000
    updates = [make_update([3, 0], [4]), make_update([0, 0], [1]), make_update([3000, 0], [4000])]

    # Act
    result, norms = norm_bounded_mean(updates, [1, 1, 2], bound=5.0)

    # Assert: s2 is scaled by 5/5000 to (3, 0, 4); s0 (norm = bound) and s1 stay.
    # Weights 1, 1, 2 (total 4): item0 = (3 + 0 + 2*3)/4 = 9/4; item1 = 0; bias = (4 + 1 + 2*4)/4 = 13/4
    assert_updates_close(result, make_update([2.25, 0.0], [3.25]))
    assert norms == [5.0, 1.0, 5000.0]


def test_norm_bounded_mean_is_the_weighted_mean_when_nothing_exceeds_the_bound() -> None:
    # Arrange: the largest norm is |(2000, 2000, 1000)| = 3000
    updates = five_silos_one_outlier()
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]

    # Act
    result, norms = norm_bounded_mean(updates, weights, bound=3000.0)

    # Assert
    assert_updates_close(result, weighted_mean(updates, weights))
    assert norms[4] == 3000.0


def test_norm_bounded_mean_keeps_a_zero_update() -> None:
    # Arrange
    updates = [{"w": np.zeros(2)}, {"w": np.array([0.0, 8.0])}]

    # Act
    result, norms = norm_bounded_mean(updates, [1, 1], bound=2.0)

    # Assert: (0 + (0, 8) * 2/8) / 2 = (0, 1)
    assert_updates_close(result, {"w": np.array([0.0, 1.0])})
    assert norms == [0.0, 8.0]


def test_norm_bounded_mean_limits_the_outlier_in_the_five_silo_example() -> None:
    # Arrange: bound 6 leaves s0..s3 (norms sqrt5, sqrt14, sqrt14, 3) and scales s4 (norm 3000) by 6/3000
    updates = five_silos_one_outlier()

    # Act
    result, norms = norm_bounded_mean(updates, [1] * 5, bound=6.0)

    # Assert: s4 -> (4, 4, 2); item0 = (1+2+3+2+4)/5 = 12/5; item1 = (2+3+1+2+4)/5 = 12/5;
    # bias = (0+1+2+1+2)/5 = 6/5
    assert_updates_close(result, make_update([2.4, 2.4], [1.2]))
    np.testing.assert_allclose(norms, [math.sqrt(5), math.sqrt(14), math.sqrt(14), 3.0, 3000.0], rtol=1e-15)


@pytest.mark.parametrize("aggregator", ["mean", "norm-bounded-mean"])
def test_sensitivity_of_the_mean_is_clip_over_expected_count(aggregator: str) -> None:
    # Arrange / Act
    value = sensitivity(aggregator, clip=1.5, n_expected=30.0)

    # Assert: 1.5 / 30 = 0.05
    assert value == pytest.approx(0.05)


@pytest.mark.parametrize("aggregator", ["weighted-mean", "median", "trimmed-mean", "krum", "multi-krum"])
def test_sensitivity_is_none_without_a_bound_of_that_form(aggregator: str) -> None:
    # Arrange / Act
    value = sensitivity(aggregator, clip=1.0, n_expected=100.0)

    # Assert
    assert value is None


def test_sensitivity_covers_every_aggregator_name() -> None:
    # Arrange / Act
    values = {name: sensitivity(name, clip=1.0, n_expected=4.0) for name in aggregators.AGGREGATORS}

    # Assert
    assert values == {
        "mean": 0.25,
        "weighted-mean": None,
        "norm-bounded-mean": 0.25,
        "median": None,
        "trimmed-mean": None,
        "krum": None,
        "multi-krum": None,
    }


@pytest.mark.parametrize("m", [1, 2, 5, 20])
def test_median_worst_case_change_is_clip_for_every_count(m: int) -> None:
    # Arrange: m copies of u and m of -u (|u| = C = 2) have median 0; one more u makes it u
    clip = 2.0
    u = np.array([1.2, -1.6])  # |u| = sqrt(1.44 + 2.56) = 2
    before = [{"w": u.copy()} for _ in range(m)] + [{"w": -u} for _ in range(m)]

    # Act
    change = np.linalg.norm(coordinate_median([*before, {"w": u.copy()}])["w"] - coordinate_median(before)["w"])

    # Assert: the change is C for every n = 2m; it does not shrink like clip / n
    assert change == pytest.approx(clip)


@pytest.mark.parametrize("m", [2, 3, 6])
def test_krum_change_approaches_twice_clip(m: int) -> None:
    # Arrange: f = m - 2; m copies of -u and the m points (1 - k*eps) u; |u| = C = 1
    u = np.array([0.6, 0.8])
    eps = 1e-4
    before = [{"w": -u} for _ in range(m)] + [{"w": (1 - k * eps) * u} for k in range(m)]

    # Act
    out_before, sel_before = multi_krum(before, num_malicious=m - 2, num_selected=1)
    out_after, sel_after = multi_krum([*before, {"w": u.copy()}], num_malicious=m - 2, num_selected=1)

    # Assert: Krum picks -u, then a point near u: the output moves by almost 2C
    assert sel_before[0] < m
    assert sel_after[0] >= m
    assert np.linalg.norm(out_after["w"] - out_before["w"]) > 2 - m * eps


def silo_sets(min_silos: int = 1, max_silos: int = 7) -> st.SearchStrategy[np.ndarray]:
    """(n, d) arrays of finite values: n silos, d coordinates."""
    shapes = st.tuples(st.integers(min_silos, max_silos), st.integers(1, 4))
    elements = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
    return shapes.flatmap(lambda shape: hnp.arrays(np.float64, shape, elements=elements))


def as_updates(rows: np.ndarray) -> list[Update]:
    return [{"w": row.copy()} for row in rows]


def clip_rows(rows: np.ndarray, clip: float) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * np.minimum(1.0, clip / np.where(norms > 0, norms, 1.0))


@settings(max_examples=200, deadline=None)
@given(rows=silo_sets(), beta=st.floats(0.0, 0.49), seed=st.integers(0, 2**32 - 1))
def test_median_and_trimmed_mean_lie_in_range_and_ignore_order(rows: np.ndarray, beta: float, seed: int) -> None:
    # Arrange
    updates = as_updates(rows)
    permuted = [updates[i] for i in np.random.default_rng(seed).permutation(len(updates))]
    low, high = rows.min(axis=0), rows.max(axis=0)
    tol = 1e-9 * (1 + np.abs(rows).max())

    # Act
    median = coordinate_median(updates)["w"]
    trimmed = trimmed_mean(updates, beta)["w"]

    # Assert
    for value in (median, trimmed):
        assert np.all(value >= low - tol)
        assert np.all(value <= high + tol)
    np.testing.assert_allclose(coordinate_median(permuted)["w"], median, rtol=0, atol=tol)
    np.testing.assert_allclose(trimmed_mean(permuted, beta)["w"], trimmed, rtol=0, atol=tol)


@settings(max_examples=200, deadline=None)
@given(rows=silo_sets(min_silos=3), seed=st.integers(0, 2**32 - 1))
def test_krum_scores_follow_a_permutation(rows: np.ndarray, seed: int) -> None:
    # Arrange
    order = np.random.default_rng(seed).permutation(len(rows))

    # Act
    scores = krum_scores(as_updates(rows), num_malicious=0)
    permuted_scores = krum_scores(as_updates(rows[order]), num_malicious=0)

    # Assert
    np.testing.assert_allclose(permuted_scores, scores[order], rtol=1e-12, atol=1e-9)


@settings(max_examples=300, deadline=None)
@given(rows=silo_sets(min_silos=2, max_silos=8), beta=st.floats(0.0, 0.49))
def test_add_remove_changes_stay_within_the_documented_bounds(rows: np.ndarray, beta: float) -> None:
    # Arrange: every input clipped to C = 1; neighbours differ by the last silo
    clip = 1.0
    clipped = clip_rows(rows, clip)
    with_all, without_last = as_updates(clipped), as_updates(clipped[:-1])

    # Act
    median_change = np.linalg.norm(coordinate_median(with_all)["w"] - coordinate_median(without_last)["w"])
    trimmed_change = np.linalg.norm(trimmed_mean(with_all, beta)["w"] - trimmed_mean(without_last, beta)["w"])

    # Assert: median <= C; trimmed mean <= 2C / sqrt(1 - 2 beta) (sensitivity Notes)
    assert median_change <= clip + 1e-9
    assert trimmed_change <= 2 * clip / math.sqrt(1 - 2 * beta) + 1e-9


Aggregate = Callable[[list[Update]], object]

ALL_AGGREGATORS: dict[str, Aggregate] = {
    "weighted_mean": lambda us: weighted_mean(us, [1.0] * len(us)),
    "coordinate_median": coordinate_median,
    "trimmed_mean": lambda us: trimmed_mean(us, 0.1),
    "krum_scores": lambda us: krum_scores(us, 0),
    "multi_krum": lambda us: multi_krum(us, 0, 1),
    "norm_bounded_mean": lambda us: norm_bounded_mean(us, [1.0] * len(us), 1.0),
}

ok = {"w": np.array([1.0, 2.0]), "b": np.array([0.5])}

BAD_UPDATES: dict[str, tuple[list[Update], str]] = {
    "empty": ([], r"updates is empty"),
    "no-parameters": ([{}, {}, {}], r"updates\[0\] has no parameters"),
    "missing-key": (
        [ok, ok, {"w": np.array([1.0, 2.0])}],
        r"updates\[2\] has different parameter names.*missing \['b'\]",
    ),
    "extra-key": (
        [ok, {**ok, "u": np.zeros(1)}, ok],
        r"updates\[1\] has different parameter names.*unexpected \['u'\]",
    ),
    "shape": (
        [ok, ok, {"w": np.array([1.0, 2.0, 3.0]), "b": np.array([0.5])}],
        r"updates\[2\]\['w'\] has shape \(3,\), updates\[0\]\['w'\] has \(2,\)",
    ),
    "nan": ([ok, {"w": np.array([np.nan, 2.0]), "b": np.array([0.5])}, ok], r"updates\[1\]\['w'\] holds NaN or inf"),
    "inf": ([ok, ok, {"w": np.array([1.0, 2.0]), "b": np.array([-np.inf])}], r"updates\[2\]\['b'\] holds NaN or inf"),
    "integer-dtype": (
        [ok, {"w": np.array([1, 2], dtype=np.int64), "b": np.array([0.5])}, ok],
        r"updates\[1\]\['w'\] has dtype int64; pass floating-point arrays",
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPDATES))
@pytest.mark.parametrize("name", list(ALL_AGGREGATORS))
def test_every_aggregator_rejects_bad_updates(name: str, case: str) -> None:
    # Arrange
    updates, message = BAD_UPDATES[case]

    # Act / Assert
    with pytest.raises(ValueError, match=message):
        ALL_AGGREGATORS[name](updates)


BAD_WEIGHTS: dict[str, tuple[list[float], str]] = {
    "length": ([1.0, 1.0], r"weights has 2 entries for 3 updates"),
    "negative": ([1.0, -0.5, 1.0], r"weights\[1\] is -0.5; every weight must be a finite number >= 0"),
    "nan": ([1.0, 1.0, math.nan], r"weights\[2\] is nan"),
    "inf": ([math.inf, 1.0, 1.0], r"weights\[0\] is inf"),
    "bool": ([1.0, True, 1.0], r"weights\[1\] is True"),
    "all-zero": ([0.0, 0, 0.0], r"weights are all zero"),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
@pytest.mark.parametrize(
    "aggregate",
    [weighted_mean, lambda us, ws: norm_bounded_mean(us, ws, 1.0)],
    ids=["weighted_mean", "norm_bounded_mean"],
)
def test_weighted_aggregators_reject_bad_weights(
    aggregate: Callable[[list[Update], list[float]], object], case: str
) -> None:
    # Arrange
    weights, message = BAD_WEIGHTS[case]

    # Act / Assert
    with pytest.raises(ValueError, match=message):
        aggregate([ok, ok, ok], weights)


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7, math.nan, math.inf, True])
def test_trimmed_mean_rejects_beta_out_of_range(beta: float) -> None:
    # Arrange / Act / Assert
    with pytest.raises(ValueError, match=r"beta must be a finite number in \[0, 0.5\)"):
        trimmed_mean([ok, ok, ok], beta)


@pytest.mark.parametrize(
    ("n", "num_malicious", "message"),
    [
        (4, 1, r"Krum needs n >= 2 \* num_malicious \+ 3 updates: got n=4 with num_malicious=1 \(needs n >= 5\)"),
        (2, 0, r"got n=2 with num_malicious=0 \(needs n >= 3\)"),
        (5, -1, r"num_malicious must be an integer >= 0; got -1"),
        (5, 1.0, r"num_malicious must be an integer >= 0; got 1.0"),
        (5, False, r"num_malicious must be an integer >= 0; got False"),
    ],
)
def test_krum_rejects_too_few_updates_or_bad_num_malicious(n: int, num_malicious: int, message: str) -> None:
    # Arrange
    updates = [ok] * n

    # Act / Assert
    with pytest.raises(ValueError, match=message):
        krum_scores(updates, num_malicious)
    with pytest.raises(ValueError, match=message):
        multi_krum(updates, num_malicious, 1)


@pytest.mark.parametrize("num_selected", [0, -1, 6, 2.0, True])
def test_multi_krum_rejects_num_selected_out_of_range(num_selected: int) -> None:
    # Arrange / Act / Assert
    with pytest.raises(ValueError, match=r"num_selected must be an integer in \[1, 5\]"):
        multi_krum(five_silos_one_outlier(), 1, num_selected)


@pytest.mark.parametrize("bound", [0.0, -1.0, math.nan, math.inf, True])
def test_norm_bounded_mean_rejects_bad_bound(bound: float) -> None:
    # Arrange / Act / Assert
    with pytest.raises(ValueError, match=r"bound must be a finite number > 0"):
        norm_bounded_mean([ok, ok], [1.0, 1.0], bound)


def test_sensitivity_rejects_an_unknown_aggregator() -> None:
    # Arrange / Act / Assert
    with pytest.raises(ValueError, match=r"aggregator must be one of mean, weighted-mean, .*; got 'fedavg'"):
        sensitivity("fedavg", clip=1.0, n_expected=10.0)


@pytest.mark.parametrize(
    ("clip", "n_expected", "name"),
    [
        (0.0, 10.0, "clip"),
        (-1.0, 10.0, "clip"),
        (math.inf, 10.0, "clip"),
        (True, 10.0, "clip"),
        (1.0, 0.0, "n_expected"),
        (1.0, math.nan, "n_expected"),
    ],
)
def test_sensitivity_rejects_bad_clip_or_expected_count(clip: float, n_expected: float, name: str) -> None:
    # Arrange / Act / Assert
    with pytest.raises(ValueError, match=rf"{name} must be a finite number > 0"):
        sensitivity("mean", clip=clip, n_expected=n_expected)
