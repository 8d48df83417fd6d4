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
        the label-skew construction of federated benchmarks (Hsu et al. 2019; the
        NIID-Bench partitioner of Li et al. 2022) with a user's *dominant item group*
        (the group most of its training items fall in) as its label: for each group
        the silos' shares of that group's users are drawn from Dirichlet(``alpha``)
        over the silos, and the group's users (in a seeded random order) are cut
        into consecutive runs of those sizes. Small ``alpha`` sends nearly all of a
        group's users to one silo (near-disjoint tastes), large ``alpha`` splits every
        group evenly. The draw is repeated (up to :data:`DIRICHLET_TRIES` times, the
        same seeded stream) until every silo has at least
        ``min(DIRICHLET_MIN_USERS, num_users // (2 * num_partitions))`` users (at
        least 1); if no draw does, the draw with the largest smallest silo is kept and
        each empty silo takes one user from the largest silo.
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
    # (U, G): training items of each user in each group; label = the dominant group
    # (ties: the lowest group index; a user without training items: group 0).
    counts = np.zeros((n_users, n_groups))
    np.add.at(counts, (split.train_user, groups[split.train_item]), 1.0)
    dominant = counts.argmax(axis=1)
    members = [np.flatnonzero(dominant == g) for g in range(n_groups)]
    need = max(1, min(DIRICHLET_MIN_USERS, n_users // (2 * num_partitions)))
    best: NDArray[np.int64] | None = None
    for _ in range(DIRICHLET_TRIES):
        owner = _dirichlet_owners(members, n_users, num_partitions, alpha, rng)
        if best is None or _smallest(owner, num_partitions) > _smallest(best, num_partitions):
            best = owner
        if _smallest(best, num_partitions) >= need:
            break
    assert best is not None
    owner = best
    # If even the best draw left a silo empty: each empty silo takes a user of the largest.
    for p in range(num_partitions):
        if not (owner == p).any():
            largest = int(np.bincount(owner, minlength=num_partitions).argmax())
            owner[np.flatnonzero(owner == largest)[0]] = p
    return [np.flatnonzero(owner == p).astype(np.int64) for p in range(num_partitions)]


#: Draws of the Dirichlet partition tried before the one with the largest smallest silo is kept.
DIRICHLET_TRIES = 1000
#: Users every Dirichlet silo should have (capped at ``num_users // (2 * num_partitions)``).
DIRICHLET_MIN_USERS = 10


def _dirichlet_owners(
    members: list[NDArray[np.int64]], n_users: int, num_partitions: int, alpha: float, rng: np.random.Generator
) -> NDArray[np.int64]:
    """One draw: each group's users cut into runs of Dirichlet(alpha)-distributed sizes, one run per silo."""
    owner = np.empty(n_users, dtype=np.int64)
    for users in members:
        if len(users) == 0:
            continue
        share = rng.dirichlet(np.full(num_partitions, alpha))
        order = rng.permutation(users)
        cuts = np.round(np.cumsum(share)[:-1] * len(users)).astype(np.int64)
        for p, run in enumerate(np.split(order, cuts)):
            owner[run] = p
    return owner


def _smallest(owner: NDArray[np.int64], num_partitions: int) -> int:
    """Users in the smallest silo of ``owner``."""
    return int(np.bincount(owner, minlength=num_partitions).min())


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
