"""Tests of the leave-one-out split and evaluation-negative sampling."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.schema import Interactions
from common.data.split import NO_ITEM, UserSplit, leave_one_out, sample_unseen
from common.data.synthetic import SyntheticSpec, generate_synthetic
from common.errors import DataError

# (user, item, timestamp) in file order. alice's rows are out of time order; bob's
# three rows share one timestamp and are interleaved with other users' rows; carol
# has only two interactions.
ROWS = [
    ("alice", "a1", 10),
    ("bob", "b1", 5),
    ("alice", "a2", 30),
    ("carol", "c1", 1),
    ("bob", "b2", 5),
    ("alice", "a3", 20),
    ("carol", "c2", 2),
    ("alice", "a4", 40),
    ("bob", "b3", 5),
    ("dave", "f1", 1),
    ("dave", "f2", 2),
    ("dave", "f3", 3),
    ("dave", "f4", 4),
]


def _log(rows: list[tuple[str, str, int]]) -> Interactions:
    users, items, times = zip(*rows, strict=True)
    return Interactions.from_external_ids(
        list(users), list(items), np.array(times), source="test"
    )


@pytest.fixture
def log() -> Interactions:
    return _log(ROWS)


def _uid(data: Interactions, name: str) -> int:
    return int(np.flatnonzero(data.user_ids == name)[0])


def _item(data: Interactions, name: str) -> int:
    return int(np.flatnonzero(data.item_ids == name)[0])


def _train_items(split: UserSplit, user: int) -> list[int]:
    return sorted(split.train_item[split.train_user == user].tolist())


def test_latest_is_test_and_second_latest_is_validation(log: Interactions) -> None:
    # Act
    split = leave_one_out(log, num_negatives=2, seed=0)
    # Assert
    alice = _uid(log, "alice")
    assert split.test_item[alice] == _item(log, "a4")
    assert split.val_item[alice] == _item(log, "a2")  # t=30 beats a3's t=20
    assert _train_items(split, alice) == sorted([_item(log, "a1"), _item(log, "a3")])


def test_equal_timestamps_are_ordered_by_file_row(log: Interactions) -> None:
    # Act
    split = leave_one_out(log, num_negatives=2, seed=0)
    # Assert
    bob = _uid(log, "bob")
    assert split.test_item[bob] == _item(log, "b3")
    assert split.val_item[bob] == _item(log, "b2")
    assert _train_items(split, bob) == [_item(log, "b1")]


def test_tie_break_follows_file_order_not_item_ids() -> None:
    # Arrange: same tie as bob's, but rows in the reverse order
    rows = [("u", "z", 7), ("u", "y", 7), ("u", "x", 7), ("v", "w", 1)]
    rows += [("v", f"f{i}", 1) for i in range(4)]
    data = _log(rows)
    # Act
    split = leave_one_out(data, num_negatives=2, seed=0)
    # Assert
    u = _uid(data, "u")
    assert split.test_item[u] == _item(data, "x")
    assert split.val_item[u] == _item(data, "y")


def test_users_with_fewer_than_three_interactions_are_train_only(log: Interactions) -> None:
    # Act
    split = leave_one_out(log, num_negatives=2, seed=0)
    # Assert
    carol = _uid(log, "carol")
    assert split.val_item[carol] == NO_ITEM
    assert split.test_item[carol] == NO_ITEM
    assert _train_items(split, carol) == sorted([_item(log, "c1"), _item(log, "c2")])
    assert split.num_train == len(ROWS) - 2 * 3  # alice, bob, dave hold out two each
    assert split.num_users == 4
    np.testing.assert_array_equal(split.user_global_idx, np.arange(4))


def test_negatives_are_exactly_the_unseen_items_when_just_enough() -> None:
    # Arrange: 20 items; user u has seen all but items 5u..5u+4, so 5 are unseen
    rows = [
        (f"u{u}", f"i{i}", t)
        for u in range(4)
        for t, i in enumerate(np.random.default_rng(u).permutation(20))
        if not 5 * u <= i < 5 * u + 5
    ]
    data = _log(rows)
    # Act
    split = leave_one_out(data, num_negatives=5, seed=3)
    # Assert
    for u in range(data.num_users):
        seen = set(data.item_idx[data.user_idx == u].tolist())
        unseen = set(range(data.num_items)) - seen
        assert len(unseen) == 5
        assert sorted(split.val_negatives[u].tolist()) == sorted(unseen)
        assert sorted(split.test_negatives[u].tolist()) == sorted(unseen)


@pytest.fixture(scope="module")
def synthetic() -> Interactions:
    return generate_synthetic(
        SyntheticSpec(num_users=200, num_items=200, mean_interactions=40, seed=5)
    )


def test_negatives_avoid_train_val_and_test_items_and_are_distinct(
    synthetic: Interactions,
) -> None:
    # Act
    split = leave_one_out(synthetic, num_negatives=50, seed=1)
    # Assert
    assert split.val_negatives.shape == (synthetic.num_users, 50)
    assert split.test_negatives.shape == (synthetic.num_users, 50)
    for u in range(synthetic.num_users):
        seen = set(synthetic.item_idx[synthetic.user_idx == u].tolist())
        assert split.val_item[u] in seen and split.test_item[u] in seen
        for negatives in (split.val_negatives[u], split.test_negatives[u]):
            assert not seen & set(negatives.tolist())
            assert len(np.unique(negatives)) == 50
            assert negatives.min() >= 0 and negatives.max() < synthetic.num_items


def test_split_partitions_each_users_interactions(synthetic: Interactions) -> None:
    # Act
    split = leave_one_out(synthetic, num_negatives=5, seed=1)
    # Assert
    for u in range(0, synthetic.num_users, 7):
        everything = sorted(synthetic.item_idx[synthetic.user_idx == u].tolist())
        parts = _train_items(split, u) + [split.val_item[u], split.test_item[u]]
        assert sorted(parts) == everything


def test_split_is_deterministic_by_seed(synthetic: Interactions) -> None:
    # Act
    a = leave_one_out(synthetic, num_negatives=20, seed=11)
    b = leave_one_out(synthetic, num_negatives=20, seed=11)
    c = leave_one_out(synthetic, num_negatives=20, seed=12)
    # Assert
    names = ("train_user", "train_item", "val_item", "test_item")
    for name in (*names, "val_negatives", "test_negatives"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.test_negatives, c.test_negatives)
    np.testing.assert_array_equal(a.test_item, c.test_item)  # only negatives use the seed
    assert not np.array_equal(a.val_negatives, a.test_negatives)


def test_sample_unseen_raises_when_a_user_has_too_few_unseen_items() -> None:
    # Arrange: user 1 has seen 8 of 10 items
    num_items = 10
    seen = np.unique(np.concatenate([[0, 1], 1 * num_items + np.arange(8)]))
    # Act / Assert
    with pytest.raises(DataError, match="user index 1"):
        sample_unseen(seen, 2, num_items, 3, np.random.default_rng(0))
    out = sample_unseen(seen, 2, num_items, 2, np.random.default_rng(0))
    assert sorted(out[1].tolist()) == [8, 9]


def test_leave_one_out_raises_when_catalogue_is_too_small(log: Interactions) -> None:
    # Act / Assert
    with pytest.raises(DataError, match="unseen evaluation negatives"):
        leave_one_out(log, num_negatives=99, seed=0)


def test_subset_reindexes_users(log: Interactions) -> None:
    # Arrange
    split = leave_one_out(log, num_negatives=3, seed=0)
    users = np.array([_uid(log, "dave"), _uid(log, "alice")])
    # Act
    sub = split.subset(users)
    # Assert
    assert sub.num_users == 2
    assert sub.num_items == split.num_items
    np.testing.assert_array_equal(sub.user_global_idx, users)
    for local, old in enumerate(users):
        assert _train_items(sub, local) == _train_items(split, old)
        assert sub.val_item[local] == split.val_item[old]
        assert sub.test_item[local] == split.test_item[old]
        np.testing.assert_array_equal(sub.test_negatives[local], split.test_negatives[old])
        np.testing.assert_array_equal(sub.val_negatives[local], split.val_negatives[old])
    assert sub.num_train == 4  # alice 2 + dave 2
    np.testing.assert_array_equal(sub.train_counts(), [2, 2])


def test_empty_subset_is_rejected(log: Interactions) -> None:
    # Arrange
    split = leave_one_out(log, num_negatives=3, seed=0)
    # Act / Assert
    with pytest.raises(DataError):
        split.subset(np.array([], dtype=np.int64))
