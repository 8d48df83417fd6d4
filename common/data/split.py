"""Leave-one-out split by time and sampled evaluation negatives."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.data.schema import Interactions
from common.errors import DataError

NO_ITEM = -1


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
    """

    num_items: int
    train_user: NDArray[np.int64]
    train_item: NDArray[np.int64]
    val_item: NDArray[np.int64]
    test_item: NDArray[np.int64]
    val_negatives: NDArray[np.int64]
    test_negatives: NDArray[np.int64]
    user_global_idx: NDArray[np.int64]

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
        )


def leave_one_out(
    data: Interactions, *, num_negatives: int = 99, seed: int
) -> UserSplit:
    """Split each user's interactions by time: latest = test, second latest = validation.

    Ties in timestamp are broken by row order in the source (a stable sort), so the
    later row in the file counts as later. Users with fewer than 3 interactions keep
    everything in train and have no held-out items.

    Evaluation negatives are sampled once per user (and separately for validation
    and test) from items the user never interacted with, in any part of the split.
    """
    order = np.lexsort((data.timestamp, data.user_idx))  # stable: by user, then time
    users = data.user_idx[order]
    items = data.item_idx[order]
    counts = np.bincount(users, minlength=data.num_users)
    ends = np.cumsum(counts)  # one past each user's last row
    heldout = counts >= 3

    val_item = np.full(data.num_users, NO_ITEM, dtype=np.int64)
    test_item = np.full(data.num_users, NO_ITEM, dtype=np.int64)
    test_item[heldout] = items[ends[heldout] - 1]
    val_item[heldout] = items[ends[heldout] - 2]

    is_train = np.ones(len(order), dtype=bool)
    is_train[ends[heldout] - 1] = False
    is_train[ends[heldout] - 2] = False

    rng = np.random.default_rng(seed)
    seen = _user_item_keys(users, items, data.num_items)
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
