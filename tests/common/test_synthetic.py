"""Tests of the seeded synthetic interaction generator."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from common.data.schema import Interactions
from common.data.synthetic import SyntheticSpec, generate_synthetic
from common.errors import DataError

SMALL = SyntheticSpec(num_users=1000, num_items=500, mean_interactions=30)


@pytest.fixture(scope="module")
def small() -> Interactions:
    return generate_synthetic(SMALL)


def _hit_rate_at_10(scores: np.ndarray, candidates: np.ndarray) -> float:
    # Column 0 of `candidates` is the held-out item; ties count against it.
    s = np.take_along_axis(scores, candidates, axis=1)
    return float(np.mean((s[:, 1:] >= s[:, :1]).sum(axis=1) < 10))


def test_same_seed_gives_same_data_and_other_seed_differs(small: Interactions) -> None:
    # Act
    again = generate_synthetic(SMALL)
    other = generate_synthetic(dataclasses.replace(SMALL, seed=1))
    # Assert
    for name in ("user_idx", "item_idx", "timestamp", "item_category"):
        np.testing.assert_array_equal(getattr(small, name), getattr(again, name))
    assert not np.array_equal(small.item_idx[:100], other.item_idx[:100])


def test_shapes_ids_and_ranges(small: Interactions) -> None:
    # Arrange
    counts = np.bincount(small.user_idx, minlength=SMALL.num_users)
    # Assert
    assert small.num_users == SMALL.num_users
    assert small.num_items == SMALL.num_items
    assert small.user_ids[:2].tolist() == ["u0", "u1"]
    assert small.item_ids[-1] == f"i{SMALL.num_items - 1}"
    assert counts.min() >= SMALL.min_interactions
    assert counts.max() <= SMALL.num_items // 2
    assert 0.7 * SMALL.mean_interactions < counts.mean() < 1.3 * SMALL.mean_interactions
    pairs = small.user_idx * small.num_items + small.item_idx
    assert len(np.unique(pairs)) == len(small)  # sampled without replacement
    same_user = np.diff(small.user_idx) == 0
    assert np.all(np.diff(small.user_idx) >= 0)
    assert np.all(np.diff(small.timestamp)[same_user] > 0)
    assert small.item_category is not None
    assert sorted(np.unique(small.item_category)) == list(range(SMALL.num_categories))


def test_popularity_is_heavy_tailed(small: Interactions) -> None:
    # Arrange
    counts = np.sort(np.bincount(small.item_idx, minlength=small.num_items))[::-1]
    # Act
    top_share = counts[: small.num_items // 10].sum() / counts.sum()
    # Assert
    assert top_share > 0.25


def test_users_concentrate_on_few_categories(small: Interactions) -> None:
    # Arrange
    assert small.item_category is not None
    shuffled = np.random.default_rng(0).permutation(small.item_category)

    def top_category_share(category: np.ndarray) -> float:
        hist = np.zeros((small.num_users, SMALL.num_categories))
        np.add.at(hist, (small.user_idx, category[small.item_idx]), 1)
        return float((hist.max(axis=1) / hist.sum(axis=1)).mean())

    # Act
    real, baseline = (
        top_category_share(small.item_category),
        top_category_share(shuffled),
    )
    # Assert
    assert real > baseline + 0.15


def test_latest_item_is_predictable_beyond_popularity(small: Interactions) -> None:
    # Arrange: leave the latest item out; rank it among 99 items the user never saw.
    # Rows are grouped by user in time order, so a user's last row is the latest.
    last = np.append(np.flatnonzero(np.diff(small.user_idx)), len(small) - 1)
    train = np.ones(len(small), dtype=bool)
    train[last] = False
    x = np.zeros((small.num_users, small.num_items))
    x[small.user_idx[train], small.item_idx[train]] = 1.0
    seen = np.zeros_like(x, dtype=bool)
    seen[small.user_idx, small.item_idx] = True
    rng = np.random.default_rng(0)
    negatives = np.array(
        [rng.choice(np.flatnonzero(~s), 99, replace=False) for s in seen]
    )
    candidates = np.c_[small.item_idx[last], negatives]
    # Act: item-kNN with cosine similarity versus popularity
    norm = np.sqrt(x.sum(axis=0)) + 1e-9
    similarity = (x.T @ x) / np.outer(norm, norm)
    np.fill_diagonal(similarity, 0.0)
    knn = _hit_rate_at_10(x @ similarity, candidates)
    popularity = _hit_rate_at_10(np.broadcast_to(x.sum(axis=0), x.shape), candidates)
    # Assert
    assert popularity > 0.2  # well above the 0.10 of a random ranking
    assert knn > popularity + 0.1


def test_many_users_for_by_user_partitions() -> None:
    # Act
    data = generate_synthetic(SyntheticSpec(num_users=5000, num_items=300, seed=3))
    # Assert: every user can be its own client with train, validation and test items
    assert data.num_users == 5000
    assert np.bincount(data.user_idx).min() >= 5


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_users", 0),
        ("num_items", True),
        ("num_items", 8),
        ("dim", 2.0),
        ("num_categories", 501),
        ("mean_interactions", math.nan),
        ("mean_interactions", 251),
        ("min_interactions", 0),
        ("popularity_exponent", -1.0),
        ("temperature", 0.0),
        ("seed", -1),
    ],
)
def test_invalid_spec_raises_naming_the_field(field: str, value: Any) -> None:
    # Act / Assert
    with pytest.raises(DataError, match=f"SyntheticSpec.{field}"):
        dataclasses.replace(SMALL, **{field: value})
