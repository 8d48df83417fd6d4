"""Tests of the leave-one-out split and evaluation-negative sampling."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from common.data.schema import Interactions
from common.data.split import (
    NO_ITEM,
    UserSplit,
    _check_heldout_apart,
    leave_one_out,
    sample_unseen,
)
from common.data.synthetic import SyntheticSpec, generate_synthetic
from common.errors import DataError, DataWarning

# Some logs here tie on purpose; the tests of those warnings are below.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*decided by a tie:common.errors.DataWarning"),
    pytest.mark.filterwarnings("ignore:.*does not look like a timestamp:common.errors.DataWarning"),
]
# A user with two interactions (train-only): items the others never saw, to sample
# evaluation negatives from.
FILLER = [("z", "o1", 1), ("z", "o2", 2)]

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


def _log(rows: list[tuple[str, str, int]], **kw: str) -> Interactions:
    users, items, times = zip(*rows, strict=True)
    return Interactions.from_external_ids(
        list(users), list(items), np.array(times), source="test", **kw
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
    # Act / Assert: alice saw 4 of the 13 items, the most of anyone
    message = "test: user 'alice' has interacted with 4 of the 13 items, so 99 unseen evaluation negatives cannot be sampled; lower data.eval-negatives to at most 9"
    with pytest.raises(DataError, match=re.escape(message)):
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


# Duplicate (user, item) rows


def _heldout_apart(split: UserSplit) -> None:
    for u in np.flatnonzero(split.test_item != NO_ITEM):
        train = set(_train_items(split, int(u)))
        assert split.val_item[u] != split.test_item[u]
        assert split.test_item[u] not in train
        assert split.val_item[u] not in train


def test_duplicate_latest_rows_no_longer_make_validation_equal_test() -> None:
    # Arrange: "x" twice at the end used to be both the validation and the test item
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", 3), ("u", "x", 4), ("u", "x", 5), *FILLER]
    data = _log(rows, row_unit="line", first_row=2)
    # Act
    with pytest.warns(DataWarning) as record:
        split = leave_one_out(data, num_negatives=1, seed=0)
    # Assert
    u = _uid(data, "u")
    assert str(record[0].message) == (
        "test: dropped 1 duplicate (user, item) rows, keeping the earliest of each pair "
        "(by time, then file order); e.g. line 6 repeats user 'u' and item 'x' of line 5"
    )
    assert split.test_item[u] == _item(data, "x")
    assert split.val_item[u] == _item(data, "c")
    assert _train_items(split, u) == sorted([_item(data, "a"), _item(data, "b")])
    _heldout_apart(split)


def test_duplicate_of_an_early_item_no_longer_puts_the_test_item_in_train() -> None:
    # Arrange: "a" first at t=1, again as the latest row (t=9)
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", 3), ("u", "d", 4), ("u", "a", 9), *FILLER]
    data = _log(rows)
    # Act
    with pytest.warns(DataWarning, match="dropped 1 duplicate"):
        split = leave_one_out(data, num_negatives=1, seed=0)
    # Assert: the earliest "a" is kept; the latest distinct item is the test item
    u = _uid(data, "u")
    assert split.test_item[u] == _item(data, "d")
    assert split.val_item[u] == _item(data, "c")
    assert split.num_train == 2 + len(FILLER)
    _heldout_apart(split)


def test_duplicates_are_counted_over_all_users_and_keep_the_earliest_by_time() -> None:
    # Arrange: v's duplicate of "p" comes first in the file but is later in time
    rows = [("v", "p", 9), ("u", "a", 1), ("v", "p", 2), ("u", "a", 1), ("v", "q", 3)]
    rows += [("v", "r", 4), ("u", "b", 2), ("u", "c", 3), ("u", "a", 7)]
    data = _log(rows)
    # Act
    with pytest.warns(DataWarning, match=r"dropped 3 duplicate .* e\.g\. row 1 repeats user 'v' and item 'p' of row 3"):
        split = leave_one_out(data, num_negatives=1, seed=0)
    # Assert: v keeps p@2, so p is v's training item
    v = _uid(data, "v")
    assert _train_items(split, v) == [_item(data, "p")]
    assert split.num_train + 2 * 2 == len(rows) - 3
    _heldout_apart(split)


def test_a_user_left_with_fewer_than_three_distinct_items_is_train_only() -> None:
    # Arrange
    rows = [("u", "a", 1), ("u", "a", 2), ("u", "b", 3), ("v", "c", 1), ("v", "d", 2), ("v", "e", 3)]
    data = _log(rows)
    # Act
    with pytest.warns(DataWarning, match="dropped 1 duplicate"):
        split = leave_one_out(data, num_negatives=1, seed=0)
    # Assert
    u = _uid(data, "u")
    assert split.test_item[u] == NO_ITEM
    assert _train_items(split, u) == sorted([_item(data, "a"), _item(data, "b")])


def test_synthetic_logs_have_no_duplicates_ties_or_warnings(synthetic: Interactions) -> None:
    # Act / Assert
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        leave_one_out(synthetic, num_negatives=5, seed=1)


def test_heldout_items_apart_from_train_is_checked_as_an_invariant() -> None:
    # Arrange: hand-built broken split (the split itself cannot produce one)
    data = _log([("u", "a", 1), ("u", "b", 2), ("u", "c", 3)])
    one = np.array([1], dtype=np.int64)
    # Act / Assert
    with pytest.raises(DataError, match="internal error in the leave-one-out split: user 'u': its test item is also in train"):
        _check_heldout_apart(data, 0 * one, 2 * one, 1 * one, 2 * one)
    with pytest.raises(DataError, match="user 'u': its validation item equals its test item"):
        _check_heldout_apart(data, 0 * one, 0 * one, 2 * one, 2 * one)


# Ties


def test_ties_that_decide_heldout_items_are_counted_with_the_rule(log: Interactions) -> None:
    # Act: bob's three rows share t=5, so both of his held-out items are file order's
    with pytest.warns(DataWarning) as record:
        leave_one_out(log, num_negatives=2, seed=0)
    # Assert
    assert [str(w.message) for w in record] == [
        "test: for 1 of 3 users the test or validation item was decided by a tie in "
        "'timestamp'; ties are broken by a stable sort by time, then file order (the "
        "later row counts as later)"
    ]


def test_a_tie_below_the_validation_item_is_not_counted() -> None:
    # Arrange: u's two earliest tie, which only orders training rows
    rows = [("u", "a", 1), ("u", "b", 1), ("u", "c", 2), ("u", "d", 3), *FILLER]
    data = _log(rows)
    # Act / Assert
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        leave_one_out(data, num_negatives=1, seed=0)


def test_a_validation_tie_alone_is_counted() -> None:
    # Arrange
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", 2), ("u", "d", 3)]
    rows += [("v", "e", 1), ("v", "f", 2), ("v", "g", 3)]
    # Act / Assert
    with pytest.warns(DataWarning, match="for 1 of 2 users the test or validation item"):
        leave_one_out(_log(rows), num_negatives=1, seed=0)


def test_a_count_column_used_as_time_does_not_look_like_a_timestamp() -> None:
    # Arrange: play counts; 2 of 3 users' two largest counts tie
    rows = [("u", "a", 1), ("u", "b", 5), ("u", "c", 5), ("v", "d", 2), ("v", "e", 2)]
    rows += [("v", "f", 2), ("w", "g", 1), ("w", "h", 2), ("w", "i", 3)]
    data = _log(rows, time_column="plays")
    # Act
    with pytest.warns(DataWarning) as record:
        leave_one_out(data, num_negatives=1, seed=0)
    # Assert
    messages = [str(w.message) for w in record]
    assert messages[0].startswith("test: for 2 of 3 users the test or validation item was decided by a tie in 'plays'")
    assert messages[1] == (
        "test: column 'plays' does not look like a timestamp: for 2 of 3 users its two "
        "latest values are equal (a count or a rating?), so file order picks the held-out "
        'items; give the real time column, or data.timestamp-col = "" for a seeded '
        "random split"
    )


def test_half_of_users_tied_is_not_yet_suspicious() -> None:
    # Arrange: exactly 1 of 2 users' latest two tie
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", 2), ("v", "d", 1), ("v", "e", 2), ("v", "f", 3)]
    # Act
    with pytest.warns(DataWarning) as record:
        leave_one_out(_log(rows), num_negatives=1, seed=0)
    # Assert
    assert len(record) == 1
    assert "does not look like a timestamp" not in str(record[0].message)


# Logs without time: seeded random order


def _untimed(rows: list[tuple[str, str]]) -> Interactions:
    return _log([(u, i, 0) for u, i in rows], time_column="")


UNTIMED = [(f"u{u}", f"i{(7 * u + j) % 40}") for u in range(30) for j in range(6)]


def test_a_log_without_time_is_split_at_random_and_says_so() -> None:
    # Arrange
    data = _untimed(UNTIMED)
    # Act
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tie warnings: there is no time to tie
        split = leave_one_out(data, num_negatives=5, seed=3)
    # Assert
    assert split.order == "random"
    assert split.subset(np.array([0, 1])).order == "random"
    last_two_in_file = [_item(data, f"i{(7 * u + 5) % 40}") for u in range(30)]
    assert (split.test_item != np.array(last_two_in_file)).any()  # not file order
    _heldout_apart(split)
    for u in range(30):
        parts = _train_items(split, u) + [split.val_item[u], split.test_item[u]]
        assert sorted(parts) == sorted(data.item_idx[data.user_idx == u].tolist())


def test_the_random_split_is_deterministic_by_seed() -> None:
    # Arrange
    data = _untimed(UNTIMED)
    # Act
    a = leave_one_out(data, num_negatives=5, seed=3)
    b = leave_one_out(data, num_negatives=5, seed=3)
    c = leave_one_out(data, num_negatives=5, seed=4)
    # Assert
    for name in ("train_user", "train_item", "val_item", "test_item", "val_negatives"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.test_item, c.test_item)


def test_a_timed_split_says_time() -> None:
    # Act / Assert
    assert leave_one_out(_log(ROWS), num_negatives=2, seed=0).order == "time"


def test_duplicates_without_time_keep_the_first_in_file_order() -> None:
    # Arrange
    data = _untimed([("u", "a"), ("u", "b"), ("u", "a"), ("u", "c"), ("u", "d"), ("z", "o1")])
    # Act / Assert
    with pytest.warns(DataWarning, match=r"keeping the earliest of each pair \(in file order\); e\.g\. row 3 repeats user 'u' and item 'a' of row 1"):
        split = leave_one_out(data, num_negatives=1, seed=0)
    assert split.num_train == 2 + 1
    _heldout_apart(split)


def test_user_split_rejects_an_unknown_order(log: Interactions) -> None:
    # Arrange
    split = leave_one_out(log, num_negatives=2, seed=0)
    # Act / Assert
    with pytest.raises(DataError, match="UserSplit.order must be one of"):
        UserSplit(**{**{f: getattr(split, f) for f in UserSplit.__dataclass_fields__}, "order": "by-rating"})
