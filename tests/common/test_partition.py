"""Tests of the user partitioners (by-user clients, iid and Dirichlet silos)."""

from __future__ import annotations

import dataclasses

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


def _pure_split(users_per_group: int, groups: int) -> tuple[UserSplit, NDArray[np.int64]]:
    """Users ``g*n .. g*n+n-1`` train on 3 items of group ``g`` only (items ``3g, 3g+1, 3g+2``)."""
    n_users = users_per_group * groups
    user = np.repeat(np.arange(n_users), 3)
    item = (3 * (user // users_per_group) + np.tile(np.arange(3), n_users)).astype(np.int64)
    empty = np.full(n_users, -1, dtype=np.int64)
    split = UserSplit(
        num_items=3 * groups,
        train_user=user.astype(np.int64),
        train_item=item,
        val_item=empty,
        test_item=empty,
        val_negatives=np.zeros((n_users, 0), dtype=np.int64),
        test_negatives=np.zeros((n_users, 0), dtype=np.int64),
        user_global_idx=np.arange(n_users, dtype=np.int64),
    )
    return split, np.arange(3 * groups, dtype=np.int64) // 3


def test_dirichlet_tiny_alpha_gives_each_silo_one_group() -> None:
    # Arrange: 2 groups of 10 users each with one taste; Dirichlet(0.001) over 2 silos sends a
    # group's users (almost surely) all to one silo; a draw that sends both groups to the same
    # silo leaves the other below its 5 users (20 // (2*2)) and is drawn again.
    split, category = _pure_split(10, 2)
    for seed in range(5):
        # Act
        parts = partition_users(
            split, scheme="silos", num_partitions=2, seed=seed, skew="dirichlet", alpha=1e-3, item_category=category
        )
        # Assert: one silo holds users 0..9 (group 0), the other 10..19 (group 1)
        assert sorted(p.tolist() for p in parts) == [list(range(10)), list(range(10, 20))]


def test_dirichlet_huge_alpha_splits_every_group_evenly() -> None:
    # Arrange: Dirichlet(1e6) over 2 silos gives shares 0.5 ± 0.0007, so each group of 10 is cut
    # at round(0.5 * 10) = 5: each silo has 5 users of group 0 and 5 of group 1.
    split, category = _pure_split(10, 2)
    # Act
    parts = partition_users(
        split, scheme="silos", num_partitions=2, seed=3, skew="dirichlet", alpha=1e6, item_category=category
    )
    # Assert
    for p in parts:
        assert (p < 10).sum() == 5 and (p >= 10).sum() == 5


def test_dirichlet_user_label_is_its_dominant_group() -> None:
    # Arrange: user 0 trains on 2 items of group 1 and 1 of group 0 -> group 1 (with users 1..2);
    # users 3..5 train on group 0 only. Tiny alpha: the two labels land in different silos.
    split, category = _pure_split(3, 2)
    split = dataclasses.replace(
        split,
        train_user=np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5], dtype=np.int64),
        train_item=np.array([0, 3, 4, 3, 4, 5, 3, 4, 5, 0, 1, 2, 0, 1, 2, 0, 1, 2], dtype=np.int64),
    )
    # Act
    parts = partition_users(
        split, scheme="silos", num_partitions=2, seed=1, skew="dirichlet", alpha=1e-3, item_category=category
    )
    # Assert
    assert sorted(p.tolist() for p in parts) == [[0, 1, 2], [3, 4, 5]]


def _mean_js_to_global(split: UserSplit, parts: list[NDArray[np.int64]], category: NDArray[np.int64]) -> float:
    """Mean Jensen-Shannon divergence (nats) of silos' category mixes from the pooled mix."""
    n_cat = int(category.max()) + 1
    cats = category[split.train_item]
    pooled = np.bincount(cats, minlength=n_cat) / len(cats)

    def kl(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / b[nz])))

    values = []
    for p in parts:
        mine = cats[np.isin(split.train_user, p)]
        hist = np.bincount(mine, minlength=n_cat) / len(mine)
        mid = (hist + pooled) / 2
        values.append(0.5 * kl(hist, mid) + 0.5 * kl(pooled, mid))
    return float(np.mean(values))


def test_js_divergence_grows_as_alpha_shrinks(split: UserSplit, data: Interactions) -> None:
    # Arrange
    assert data.item_category is not None
    seeds = range(4)

    def js(**kwargs: object) -> float:
        return float(
            np.mean(
                [
                    _mean_js_to_global(
                        split,
                        partition_users(
                            split, scheme="silos", num_partitions=5, seed=s, item_category=data.item_category, **kwargs  # type: ignore[arg-type]
                        ),
                        data.item_category,
                    )
                    for s in seeds
                ]
            )
        )

    # Act
    iid = js(skew="iid")
    values = [js(skew="dirichlet", alpha=a) for a in (100.0, 1.0, 0.1)]
    # Assert: (measured 0.0013 < 0.018 < 0.074; IID 0.0039). A large alpha splits every label
    # group evenly, a stratified split, so it is even closer to the pool than a random one.
    assert values[0] < values[1] < values[2], values
    assert values[0] < iid < values[2] / 5, (iid, values)
