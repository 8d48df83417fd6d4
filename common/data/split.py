"""Leave-one-out split (by time, or seeded random without time) and sampled evaluation negatives."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from common.data.schema import Interactions
from common.errors import DataError, DataWarning

NO_ITEM = -1
#: How a split chose held-out items: by time, or by a seeded shuffle (log without time).
SPLIT_ORDERS: Final = ("time", "random")
_RANDOM_ORDER_STREAM = 0x6F72646572  # "order": the shuffle's stream, apart from the negatives'


@dataclass(frozen=True, slots=True)
class UserSplit:
    """Train interactions and held-out items for a set of users.

    Users are indexed locally ``0..num_users-1``; ``user_global_idx`` maps them back
    to the full dataset (this mapping never leaves the silo that holds it).

    Parameters
    ----------
    num_items : int
        Size of the shared catalogue.
    train_user, train_item : (N,) int64
        Training positives (local user index, item index).
    val_item, test_item : (U,) int64
        Held-out item per user, ``NO_ITEM`` for users with < 3 interactions.
    val_negatives, test_negatives : (U, n) int64
        Sampled items the user never interacted with (fixed by seed).
    user_global_idx : (U,) int64
        Index of each local user in the full dataset.
    order : {"time", "random"}
        How held-out items were chosen: the latest two by time, or (for a log
        without time) the last two of a seeded shuffle of each user's items.
    """

    num_items: int
    train_user: NDArray[np.int64]
    train_item: NDArray[np.int64]
    val_item: NDArray[np.int64]
    test_item: NDArray[np.int64]
    val_negatives: NDArray[np.int64]
    test_negatives: NDArray[np.int64]
    user_global_idx: NDArray[np.int64]
    # One of SPLIT_ORDERS. Typed Any, not Literal, so that code rebuilding a split
    # from a mapping of arrays (``UserSplit(**arrays)``) still type-checks;
    # __post_init__ checks the value.
    order: Any = "time"

    def __post_init__(self) -> None:
        """Reject an unknown ``order``."""
        if self.order not in SPLIT_ORDERS:
            raise DataError(f"UserSplit.order must be one of {SPLIT_ORDERS}, got {self.order!r}")

    @property
    def num_users(self) -> int:
        """Number of users in this split."""
        return len(self.user_global_idx)

    @property
    def num_train(self) -> int:
        """Number of training positives."""
        return len(self.train_user)

    def train_counts(self) -> NDArray[np.int64]:
        """Training interactions per local user, shape (U,)."""
        return np.bincount(self.train_user, minlength=self.num_users).astype(np.int64)

    def subset(self, users: NDArray[np.int64]) -> UserSplit:
        """The split restricted to ``users`` (local indices), re-indexed 0..len-1."""
        users = np.asarray(users, dtype=np.int64)
        if len(users) == 0:
            raise DataError("cannot take an empty subset of users")
        remap = np.full(self.num_users, -1, dtype=np.int64)
        remap[users] = np.arange(len(users))
        keep = remap[self.train_user] >= 0
        return UserSplit(
            num_items=self.num_items,
            train_user=remap[self.train_user[keep]],
            train_item=self.train_item[keep],
            val_item=self.val_item[users],
            test_item=self.test_item[users],
            val_negatives=self.val_negatives[users],
            test_negatives=self.test_negatives[users],
            user_global_idx=self.user_global_idx[users],
            order=self.order,
        )


def leave_one_out(
    data: Interactions, *, num_negatives: int = 99, seed: int
) -> UserSplit:
    """Split each user's interactions by time: latest = test, second latest = validation.

    Ties in timestamp are broken by row order in the source (a stable sort by time,
    then file order), so the later row in the file counts as later; a `DataWarning`
    counts the users whose test or validation item a tie decided, and a second one
    says when the time column does not look like a time at all (more than half of
    the users' two latest values tie). Users with fewer than 3 interactions keep
    everything in train and have no held-out items.

    Duplicate (user, item) rows are dropped but the earliest of each pair (by time,
    then file order), with a `DataWarning` naming the source, the number dropped and
    an example; otherwise a repeat could make the validation item equal the test
    item, or put the test item in train.

    A log without time (``data.time_column == ""``) is split at random instead:
    each user's interactions are shuffled by a generator seeded from ``seed``
    (deterministic), and the last two of the shuffle are held out; the split's
    ``order`` is then ``"random"``.

    Evaluation negatives are sampled once per user (and separately for validation
    and test) from items the user never interacted with, in any part of the split.

    Raises
    ------
    DataError
        If a user has interacted with so many items that fewer than
        ``num_negatives`` remain to sample from.
    """
    seen = _user_item_keys(data.user_idx, data.item_idx, data.num_items)
    _check_negatives(data, seen, num_negatives)
    if data.has_time:
        order = np.lexsort((data.timestamp, data.user_idx))  # stable: by user, then time
    else:
        order = np.argsort(data.user_idx, kind="stable")  # by user, then file order
    order = _drop_duplicates(data, order)
    if not data.has_time:
        shuffle = np.random.default_rng([seed, _RANDOM_ORDER_STREAM]).random(len(order))
        order = order[np.lexsort((shuffle, data.user_idx[order]))]
    users = data.user_idx[order]
    items = data.item_idx[order]
    counts = np.bincount(users, minlength=data.num_users)
    ends = np.cumsum(counts)  # one past each user's last row
    heldout = counts >= 3
    if data.has_time:
        _warn_ties(data, data.timestamp[order], ends[heldout])

    val_item = np.full(data.num_users, NO_ITEM, dtype=np.int64)
    test_item = np.full(data.num_users, NO_ITEM, dtype=np.int64)
    test_item[heldout] = items[ends[heldout] - 1]
    val_item[heldout] = items[ends[heldout] - 2]

    is_train = np.ones(len(order), dtype=bool)
    is_train[ends[heldout] - 1] = False
    is_train[ends[heldout] - 2] = False
    _check_heldout_apart(data, users[is_train], items[is_train], val_item, test_item)

    rng = np.random.default_rng(seed)
    val_neg = sample_unseen(seen, data.num_users, data.num_items, num_negatives, rng)
    test_neg = sample_unseen(seen, data.num_users, data.num_items, num_negatives, rng)
    return UserSplit(
        num_items=data.num_items,
        train_user=users[is_train],
        train_item=items[is_train],
        val_item=val_item,
        test_item=test_item,
        val_negatives=val_neg,
        test_negatives=test_neg,
        user_global_idx=np.arange(data.num_users, dtype=np.int64),
        order="time" if data.has_time else "random",
    )


def _check_negatives(
    data: Interactions, seen_keys: NDArray[np.int64], num_negatives: int
) -> None:
    """Raise, naming the user, if someone has too few unseen items to sample from."""
    seen = np.bincount(seen_keys // data.num_items, minlength=data.num_users)
    if data.num_items - seen.max() >= num_negatives:
        return
    u = int(seen.argmax())
    free = data.num_items - int(seen[u])
    fix = f"lower data.eval-negatives to at most {free}, or" if free else "the log needs"
    raise DataError(
        f"{data.source}: user {data.user_ids[u]!r} has interacted with {seen[u]} of "
        f"the {data.num_items} items, so {num_negatives} unseen evaluation negatives "
        f"cannot be sampled; {fix} a larger catalogue (items this user never saw)"
    )


def _drop_duplicates(data: Interactions, order: NDArray[np.int64]) -> NDArray[np.int64]:
    """Keep the first row of each (user, item) pair along ``order``, warning if any go."""
    keys = data.user_idx[order] * data.num_items + data.item_idx[order]
    uniq, first = np.unique(keys, return_index=True)  # first: earliest along order
    keep = np.zeros(len(order), dtype=bool)
    keep[first] = True
    if keep.all():
        return order
    dropped = np.flatnonzero(~keep)
    row = int(order[dropped].min())  # the first dropped row in file order
    pos = int(np.flatnonzero(order == row)[0])
    kept = int(order[first[np.searchsorted(uniq, keys[pos])]])
    rule = "by time, then file order" if data.has_time else "in file order"
    warnings.warn(
        f"{data.source}: dropped {len(dropped)} duplicate (user, item) rows, keeping "
        f"the earliest of each pair ({rule}); e.g. {data.locate(row)} repeats user "
        f"{data.user_ids[data.user_idx[row]]!r} and item "
        f"{data.item_ids[data.item_idx[row]]!r} of {data.locate(kept)}",
        DataWarning,
        stacklevel=3,
    )
    return order[keep]


def _warn_ties(
    data: Interactions, times: NDArray[np.int64], ends: NDArray[np.int64]
) -> None:
    """Warn when equal times decided held-out items (``ends``: of held-out users)."""
    test_tie = times[ends - 1] == times[ends - 2]
    val_tie = times[ends - 2] == times[ends - 3]
    tied = int((test_tie | val_tie).sum())
    if tied:
        warnings.warn(
            f"{data.source}: for {tied} of {len(ends)} users the test or validation "
            f"item was decided by a tie in {data.time_column!r}; ties are broken by a "
            "stable sort by time, then file order (the later row counts as later)",
            DataWarning,
            stacklevel=3,
        )
    if 2 * int(test_tie.sum()) > len(ends):
        warnings.warn(
            f"{data.source}: column {data.time_column!r} does not look like a "
            f"timestamp: for {int(test_tie.sum())} of {len(ends)} users its two latest "
            "values are equal (a count or a rating?), so file order picks the held-out "
            "items; give the real time column, or data.timestamp-col = \"\" for a "
            "seeded random split",
            DataWarning,
            stacklevel=3,
        )


def _check_heldout_apart(
    data: Interactions,
    train_user: NDArray[np.int64],
    train_item: NDArray[np.int64],
    val_item: NDArray[np.int64],
    test_item: NDArray[np.int64],
) -> None:
    """Raise unless each user's validation, test and train items are distinct.

    Holds by construction once duplicates are dropped; checked because a breach
    would silently inflate every metric.
    """
    problem = ""
    for name, held in (("test", test_item), ("validation", val_item)):
        leaked = train_item == held[train_user]  # NO_ITEM never equals an item
        if leaked.any():
            problem, u = f"its {name} item is also in train", int(train_user[leaked.argmax()])
    same = (val_item == test_item) & (test_item != NO_ITEM)
    if same.any():
        problem, u = "its validation item equals its test item", int(same.argmax())
    if problem:
        raise DataError(
            f"{data.source}: internal error in the leave-one-out split: user "
            f"{data.user_ids[u]!r}: {problem}; please report it"
        )


def _user_item_keys(
    users: NDArray[np.int64], items: NDArray[np.int64], num_items: int
) -> NDArray[np.int64]:
    """Sorted unique ``user * num_items + item`` keys (for fast membership tests)."""
    return np.unique(users * num_items + items)


def sample_unseen(
    seen_keys: NDArray[np.int64],
    num_users: int,
    num_items: int,
    n: int,
    rng: np.random.Generator,
) -> NDArray[np.int64]:
    """Sample ``n`` distinct items per user among items absent from ``seen_keys``.

    Returns a (num_users, n) array. Raises DataError when a user has interacted with
    so many items that fewer than ``n`` remain.
    """
    seen_per_user = np.bincount(seen_keys // num_items, minlength=num_users)
    short = np.flatnonzero(num_items - seen_per_user < n)
    if len(short):
        raise DataError(
            f"user index {short[0]} has interacted with {seen_per_user[short[0]]} of "
            f"{num_items} items; {n} unseen evaluation negatives cannot be sampled"
        )
    out = np.empty((num_users, n), dtype=np.int64)
    todo = np.arange(num_users)
    width = 2 * n + 8
    while len(todo):
        cand = rng.integers(0, num_items, size=(len(todo), width))
        keys = todo[:, None] * num_items + cand
        pos = np.searchsorted(seen_keys, keys).clip(max=len(seen_keys) - 1)
        valid = seen_keys[pos] != keys
        # Keep the first occurrence of each candidate within a row.
        srt = np.sort(np.where(valid, cand, -1 - np.arange(width)), axis=1)
        first = np.ones_like(valid)
        first[:, 1:] = srt[:, 1:] != srt[:, :-1]
        uniq = np.where(first & (srt >= 0), srt, -1)
        enough = (uniq >= 0).sum(axis=1) >= n
        for row in np.flatnonzero(enough):
            picked = uniq[row][uniq[row] >= 0]
            out[todo[row]] = rng.permutation(picked)[:n]
        todo = todo[~enough]
        width *= 2
    return out
