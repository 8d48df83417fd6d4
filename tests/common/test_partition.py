"""Tests of the user partitioners (by-user clients, iid and Dirichlet silos)."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from common.data.partition import partition_users
from common.data.schema import Interactions
from common.data.split import UserSplit, leave_one_out
from common.data.synthetic import SyntheticSpec, generate_synthetic
from common.errors import DataError

SPEC = SyntheticSpec(
    num_users=400, num_items=200, num_categories=8, mean_interactions=20, seed=3
)


@pytest.fixture(scope="module")
def data() -> Interactions:
    return generate_synthetic(SPEC)


@pytest.fixture(scope="module")
def split(data: Interactions) -> UserSplit:
    return leave_one_out(data, num_negatives=10, seed=0)


def _assert_disjoint_cover(parts: list[NDArray[np.int64]], num_users: int) -> None:
    everyone = np.concatenate(parts)
    assert len(everyone) == num_users  # no user twice ...
    np.testing.assert_array_equal(np.sort(everyone), np.arange(num_users))  # ... or missing
    assert all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def _mean_tv_to_global(
    split: UserSplit, parts: list[NDArray[np.int64]], category: NDArray[np.int64]
) -> float:
    """Mean total-variation distance of silos' category histograms from the global one."""
    n_cat = int(category.max()) + 1
    cats = category[split.train_item]
    glob = np.bincount(cats, minlength=n_cat) / len(cats)
    distances = []
    for p in parts:
        mine = cats[np.isin(split.train_user, p)]
        hist = np.bincount(mine, minlength=n_cat) / len(mine)
        distances.append(0.5 * np.abs(hist - glob).sum())
    return float(np.mean(distances))


def test_by_user_gives_one_user_per_partition(split: UserSplit) -> None:
    # Act
    parts = partition_users(split, scheme="by-user", num_partitions=split.num_users, seed=0)
    # Assert
    assert [p.tolist() for p in parts] == [[u] for u in range(split.num_users)]


@pytest.mark.parametrize("delta", [-1, 1])
def test_by_user_needs_one_partition_per_user(split: UserSplit, delta: int) -> None:
    # Act / Assert
    with pytest.raises(DataError, match="one client per user"):
        partition_users(
            split, scheme="by-user", num_partitions=split.num_users + delta, seed=0
        )


def test_iid_silos_are_disjoint_cover_and_balanced(split: UserSplit) -> None:
    # Act
    parts = partition_users(split, scheme="silos", num_partitions=7, seed=1)
    # Assert
    assert len(parts) == 7
    _assert_disjoint_cover(parts, split.num_users)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_silos_are_deterministic_by_seed(split: UserSplit) -> None:
    # Act
    a = partition_users(split, scheme="silos", num_partitions=4, seed=9)
    b = partition_users(split, scheme="silos", num_partitions=4, seed=9)
    c = partition_users(split, scheme="silos", num_partitions=4, seed=10)
    # Assert
    assert [p.tolist() for p in a] == [p.tolist() for p in b]
    assert [p.tolist() for p in a] != [p.tolist() for p in c]


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_silos_are_disjoint_cover_and_non_empty(
    split: UserSplit, data: Interactions, alpha: float
) -> None:
    # Act
    parts = partition_users(
        split,
        scheme="silos",
        num_partitions=5,
        seed=2,
        skew="dirichlet",
        alpha=alpha,
        item_category=data.item_category,
    )
    # Assert
    assert len(parts) == 5
    _assert_disjoint_cover(parts, split.num_users)


def test_dirichlet_fills_every_silo_even_when_many(split: UserSplit) -> None:
    # Act: popularity-decile groups (no categories), tiny alpha, many silos
    parts = partition_users(
        split, scheme="silos", num_partitions=60, seed=4, skew="dirichlet", alpha=0.01
    )
    # Assert
    assert len(parts) == 60
    _assert_disjoint_cover(parts, split.num_users)


def test_small_alpha_makes_silos_more_skewed_than_iid(
    split: UserSplit, data: Interactions
) -> None:
    # Arrange
    assert data.item_category is not None
    tv_iid, tv_dir = [], []
    # Act
    for seed in range(3):
        iid = partition_users(split, scheme="silos", num_partitions=5, seed=seed)
        skewed = partition_users(
            split,
            scheme="silos",
            num_partitions=5,
            seed=seed,
            skew="dirichlet",
            alpha=0.1,
            item_category=data.item_category,
        )
        tv_iid.append(_mean_tv_to_global(split, iid, data.item_category))
        tv_dir.append(_mean_tv_to_global(split, skewed, data.item_category))
    # Assert
    assert np.mean(tv_dir) > 2 * np.mean(tv_iid)
    assert np.mean(tv_dir) > 0.12


def test_dirichlet_is_deterministic_by_seed(split: UserSplit, data: Interactions) -> None:
    # Arrange
    category = data.item_category
    # Act
    a, b = (
        partition_users(
            split,
            scheme="silos",
            num_partitions=5,
            seed=5,
            skew="dirichlet",
            alpha=0.3,
            item_category=category,
        )
        for _ in range(2)
    )
    # Assert
    assert [p.tolist() for p in a] == [p.tolist() for p in b]


@pytest.mark.parametrize("skew", ["iid", "dirichlet"])
def test_more_silos_than_users_is_rejected(split: UserSplit, skew: str) -> None:
    # Act / Assert
    with pytest.raises(DataError, match="non-empty silos"):
        partition_users(
            split,
            scheme="silos",
            num_partitions=split.num_users + 1,
            seed=0,
            skew=skew,  # type: ignore[arg-type]
        )


def test_silos_as_many_as_users_puts_one_user_in_each(split: UserSplit) -> None:
    # Act
    parts = partition_users(split, scheme="silos", num_partitions=split.num_users, seed=0)
    # Assert
    assert sorted(p.tolist() for p in parts) == [[u] for u in range(split.num_users)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scheme": "silos", "num_partitions": 0},
        {"scheme": "nodes", "num_partitions": 2},
        {"scheme": "silos", "num_partitions": 2, "skew": "zipf"},
        {"scheme": "silos", "num_partitions": 2, "skew": "dirichlet", "alpha": 0.0},
    ],
)
def test_bad_arguments_are_rejected(split: UserSplit, kwargs: dict[str, object]) -> None:
    # Act / Assert
    with pytest.raises(DataError):
        partition_users(split, seed=0, **kwargs)  # type: ignore[arg-type]
