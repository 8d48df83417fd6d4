"""Partitioners: assign users to clients (every user a client, or N silos)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray

from common.data.split import UserSplit
from common.errors import DataError

Scheme = Literal["by-user", "silos"]
Skew = Literal["iid", "dirichlet"]


def partition_users(
    split: UserSplit,
    *,
    scheme: Scheme,
    num_partitions: int,
    seed: int,
    skew: Skew = "iid",
    alpha: float = 0.5,
    item_category: NDArray[np.int64] | None = None,
) -> list[NDArray[np.int64]]:
    """Assign every user of ``split`` to exactly one of ``num_partitions`` clients.

    Parameters
    ----------
    scheme
        ``by-user``: every user is its own client (``num_partitions`` must equal the
        number of users). ``silos``: users are split across ``num_partitions``
        platforms.
    skew
        For ``silos``. ``iid``: a uniformly random, equal-size split. ``dirichlet``:
        each silo draws a taste over item groups from Dirichlet(``alpha``) and each
        user joins a silo with probability proportional to how well the silo's taste
        matches the user's training items; small ``alpha`` gives specialised silos.
    item_category
        Item groups for ``dirichlet`` skew; without it, items are grouped into 10
        popularity deciles of the training counts.

    Returns
    -------
    list of (U_p,) int64 arrays
        Sorted user indices per partition; every partition is non-empty.

    Raises
    ------
    DataError
        If the counts do not fit or a partition would be empty.
    """
    n_users = split.num_users
    if num_partitions < 1:
        raise DataError(f"num_partitions must be >= 1, got {num_partitions}")
    if scheme == "by-user":
        if num_partitions != n_users:
            raise DataError(
                f"the by-user partition makes one client per user: it needs "
                f"{n_users} partitions (num-supernodes), got {num_partitions}"
            )
        return [np.array([u], dtype=np.int64) for u in range(n_users)]
    if scheme != "silos":
        raise DataError(f"unknown partition scheme {scheme!r}; use 'by-user' or 'silos'")
    if num_partitions > n_users:
        raise DataError(
            f"cannot split {n_users} users into {num_partitions} non-empty silos"
        )
    rng = np.random.default_rng(seed)
    if skew == "iid":
        perm = rng.permutation(n_users)
        return [np.sort(p) for p in np.array_split(perm, num_partitions)]
    if skew != "dirichlet":
        raise DataError(f"unknown skew {skew!r}; use 'iid' or 'dirichlet'")
    if not alpha > 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
    groups = _item_groups(split, item_category)
    n_groups = int(groups.max()) + 1
    # (U, G): share of each user's training items in each group
    profile = np.zeros((n_users, n_groups))
    np.add.at(profile, (split.train_user, groups[split.train_item]), 1.0)
    profile /= np.maximum(profile.sum(axis=1, keepdims=True), 1.0)
    taste = rng.dirichlet(np.full(n_groups, alpha), size=num_partitions)  # (P, G)
    logits = np.log(profile @ taste.T + 1e-9) + rng.gumbel(size=(n_users, num_partitions))
    owner = logits.argmax(axis=1)
    # Guarantee non-empty silos: each empty silo takes the user that prefers it most.
    for p in np.flatnonzero(np.bincount(owner, minlength=num_partitions) == 0):
        donors = np.flatnonzero(np.bincount(owner, minlength=num_partitions)[owner] > 1)
        owner[donors[np.argmax(logits[donors, p] - logits[donors, owner[donors]])]] = p
    return [np.flatnonzero(owner == p).astype(np.int64) for p in range(num_partitions)]


def _item_groups(
    split: UserSplit, item_category: NDArray[np.int64] | None
) -> NDArray[np.int64]:
    """Item groups for skewed partitioning: categories, or popularity deciles."""
    if item_category is not None and (item_category >= 0).any():
        groups = item_category.copy()
        groups[groups < 0] = groups.max() + 1  # unknown category is its own group
        return groups
    counts = np.bincount(split.train_item, minlength=split.num_items)
    ranks = np.argsort(np.argsort(counts, kind="stable"), kind="stable")
    return (ranks * 10 // split.num_items).astype(np.int64)
