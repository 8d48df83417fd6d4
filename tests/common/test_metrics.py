"""Tests of common.metrics against hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from common.errors import DataError, DataWarning
from common.metrics import (
    activity_histogram_sums,
    activity_quintile_gap,
    arp_per_user,
    average_recommendation_popularity,
    catalogue_coverage,
    coverage_from_counts,
    dcg_at_k,
    full_ranking_ranks,
    hit_rate_at_k,
    hits_at_k,
    item_exposure_counts,
    ndcg_at_k,
    quintile_gap_from_histogram,
    recall_at_k,
    sampled_rank,
    top_k_items,
)


def test_target_scored_highest_gives_perfect_hr_and_ndcg() -> None:
    # Arrange
    pos = np.array([5.0, 1.0])
    neg = np.array([[1.0, 2.0, 3.0], [0.9, -1.0, 0.0]])
    # Act
    ranks = sampled_rank(pos, neg)
    # Assert
    assert ranks.tolist() == [0, 0]
    assert ranks.dtype == np.int64
    assert hit_rate_at_k(ranks, 1) == 1.0
    assert ndcg_at_k(ranks, 1) == 1.0


def test_target_scored_lowest_gives_no_hit() -> None:
    # Arrange
    pos = np.array([0.0])
    neg = np.array([[1.0, 2.0, 3.0]])
    # Act
    ranks = sampled_rank(pos, neg)
    # Assert
    assert ranks.tolist() == [3]
    assert hit_rate_at_k(ranks, 3) == 0.0
    assert ndcg_at_k(ranks, 3) == 0.0


def test_ties_count_against_target() -> None:
    # Arrange: two negatives tie with the target, one is below it.
    pos = np.array([1.0])
    neg = np.array([[1.0, 1.0, 0.5]])
    # Act
    ranks = sampled_rank(pos, neg)
    # Assert
    assert ranks.tolist() == [2]
    assert hit_rate_at_k(ranks, 2) == 0.0


def test_ndcg_hand_computed() -> None:
    # Arrange: rank 2 -> 1/log2(4) = 0.5, rank 0 -> 1, rank 12 -> 0 (outside k=10).
    ranks = np.array([2, 0, 12])
    # Act
    per_user = dcg_at_k(ranks, 10)
    mean = ndcg_at_k(ranks, 10)
    # Assert
    np.testing.assert_allclose(per_user, [0.5, 1.0, 0.0])
    assert mean == pytest.approx(0.5)
    assert hits_at_k(ranks, 10).tolist() == [1.0, 1.0, 0.0]
    assert hit_rate_at_k(ranks, 10) == pytest.approx(2 / 3)


def test_recall_equals_hit_rate_with_one_held_out_item() -> None:
    # Arrange
    ranks = np.array([0, 4, 9, 10, 50])
    # Act
    recall = recall_at_k(ranks, 10)
    # Assert
    assert recall == hit_rate_at_k(ranks, 10) == pytest.approx(0.6)


EMPTY_CASES: list[Callable[[], float]] = [
    lambda: hit_rate_at_k(np.array([], dtype=np.int64), 10),
    lambda: ndcg_at_k(np.array([], dtype=np.int64), 10),
    lambda: recall_at_k(np.array([], dtype=np.int64), 10),
    lambda: average_recommendation_popularity(np.zeros((0, 3), dtype=np.int64), np.ones(5)),
    lambda: catalogue_coverage(np.zeros((0, 3), dtype=np.int64), 5),
    lambda: coverage_from_counts(np.zeros(5, dtype=np.int64)),
    lambda: activity_quintile_gap(np.array([]), np.array([], dtype=np.int64)),
    lambda: quintile_gap_from_histogram(np.zeros(4, dtype=np.int64), np.zeros(4)),
]


@pytest.mark.parametrize("metric", EMPTY_CASES)
def test_empty_input_returns_nan_with_warning(metric: Callable[[], float]) -> None:
    # Arrange: see EMPTY_CASES.
    # Act
    with pytest.warns(DataWarning):
        value = metric()
    # Assert
    assert math.isnan(value)


def test_nan_score_raises() -> None:
    # Arrange
    pos = np.array([1.0, np.nan])
    neg = np.zeros((2, 3))
    scores = np.array([[0.1, np.nan, 0.3]])
    no_exclusions = np.zeros((1, 3), dtype=bool)
    # Act / Assert
    with pytest.raises(DataError):
        sampled_rank(pos, neg)
    with pytest.raises(DataError):
        full_ranking_ranks(scores, np.array([0]), no_exclusions)
    with pytest.raises(DataError):
        top_k_items(scores, no_exclusions, 1)


def test_top_k_never_contains_excluded_items_and_breaks_ties_by_index() -> None:
    # Arrange: items 0 and 3 (the best) are excluded; items 1, 2, 4 tie.
    scores = np.array([[9.0, 1.0, 1.0, 8.0, 1.0, 0.5]])
    exclude = np.array([[True, False, False, True, False, False]])
    # Act
    top = top_k_items(scores, exclude, 4)
    # Assert
    assert top.tolist() == [[1, 2, 4, 5]]
    assert top.dtype == np.int64


def test_top_k_with_too_few_candidates_raises() -> None:
    # Arrange
    scores = np.zeros((1, 3))
    exclude = np.array([[True, True, False]])
    # Act / Assert
    with pytest.raises(DataError):
        top_k_items(scores, exclude, 2)


def test_full_ranking_ignores_excluded_training_items() -> None:
    # Arrange: target is item 2 (score 0.5); items 0 and 1 score higher but item 0 is a
    # training item, item 4 ties with the target.
    scores = np.array([[0.9, 0.8, 0.5, 0.1, 0.5]])
    exclude = np.array([[True, False, False, False, False]])
    # Act
    ranks = full_ranking_ranks(scores, np.array([2]), exclude)
    # Assert: item 1 beats it, item 4 ties against it -> rank 2.
    assert ranks.tolist() == [2]


def test_full_ranking_excluded_target_raises() -> None:
    # Arrange
    scores = np.array([[0.9, 0.8]])
    exclude = np.array([[False, True]])
    # Act / Assert
    with pytest.raises(DataError):
        full_ranking_ranks(scores, np.array([1]), exclude)


def test_coverage_hand_computed_and_from_summed_counts() -> None:
    # Arrange: items {0, 1, 2} on silo A and {2, 5} on silo B of a 10-item catalogue.
    silo_a = np.array([[0, 1], [2, 1]])
    silo_b = np.array([[5, 2]])
    # Act
    counts_a = item_exposure_counts(silo_a, 10)
    counts_b = item_exposure_counts(silo_b, 10)
    pooled = coverage_from_counts(counts_a + counts_b)
    # Assert
    assert counts_a.tolist() == [1, 2, 1, 0, 0, 0, 0, 0, 0, 0]
    assert catalogue_coverage(silo_a, 10) == pytest.approx(0.3)
    assert pooled == pytest.approx(0.4)
    assert pooled == catalogue_coverage(np.vstack([silo_a, silo_b]), 10)


def test_arp_hand_computed() -> None:
    # Arrange: 4 users; train counts per item [4, 2, 1, 0] -> popularity [1, .5, .25, 0].
    popularity = np.array([4, 2, 1, 0]) / 4
    top = np.array([[0, 1], [2, 3]])
    # Act
    per_user = arp_per_user(top, popularity)
    arp = average_recommendation_popularity(top, popularity)
    # Assert: user 0 -> (1 + .5)/2 = .75, user 1 -> (.25 + 0)/2 = .125.
    np.testing.assert_allclose(per_user, [0.75, 0.125])
    assert arp == pytest.approx(0.4375)


def test_quintile_gap_hand_computed() -> None:
    # Arrange: 10 users with distinct activity; the 2 least active both hit, of the 2
    # most active only one hits.
    activity = np.arange(1, 11)
    hits = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 1], dtype=float)
    # Act
    gap = activity_quintile_gap(hits, activity)
    # Assert: 1.0 - 0.5
    assert gap == pytest.approx(0.5)


def test_quintile_gap_splits_boundary_ties_pro_rata() -> None:
    # Arrange: 5 users -> groups of 1 user. Activity 1 is shared by two users (hits 1, 0),
    # activity 3 by two users (hits 1, 1); each counts with weight 1/2.
    activity = np.array([1, 1, 2, 3, 3])
    hits = np.array([1.0, 0.0, 1.0, 1.0, 1.0])
    # Act
    gap = activity_quintile_gap(hits, activity)
    shuffled = activity_quintile_gap(hits[[1, 0, 2, 4, 3]], activity[[1, 0, 2, 4, 3]])
    # Assert: (0.5*1 + 0.5*0) - (0.5*1 + 0.5*1) = -0.5, independent of tie order.
    assert gap == pytest.approx(-0.5)
    assert shuffled == gap


def test_histogram_sums_hand_computed() -> None:
    # Arrange
    activity = np.array([0, 2, 2, 7])
    hits = np.array([1.0, 0.0, 1.0, 1.0])
    # Act: activity 7 is clipped into bucket 3.
    counts, sums = activity_histogram_sums(hits, activity, max_activity=3)
    # Assert
    assert counts.tolist() == [1, 0, 2, 1]
    assert sums.tolist() == [1.0, 0.0, 1.0, 1.0]


def test_pooled_histogram_gap_equals_exact_gap_on_random_data() -> None:
    # Arrange: 3 silos with random activity (many ties) and random hits.
    rng = np.random.default_rng(1234)
    activity = rng.integers(1, 40, size=257)
    hits = (rng.random(257) < 0.3).astype(float)
    silos = np.array_split(rng.permutation(257), 3)
    # Act
    histograms = [activity_histogram_sums(hits[s], activity[s], max_activity=40) for s in silos]
    counts = sum(h[0] for h in histograms)
    hit_sums = sum(h[1] for h in histograms)
    pooled = quintile_gap_from_histogram(counts, hit_sums)
    # Assert
    assert pooled == pytest.approx(activity_quintile_gap(hits, activity), abs=1e-12)
