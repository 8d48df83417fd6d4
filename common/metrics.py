"""Vectorised ranking, coverage, popularity-bias and fairness metrics (pure numpy)."""

from __future__ import annotations

import warnings

import numpy as np
from numpy.typing import ArrayLike, NDArray

from common.errors import DataError, DataWarning

QUINTILE = 0.2
"""Fraction of users in each activity group compared by the quintile gap."""


# --------------------------------------------------------------------------- helpers


def _float_array(x: ArrayLike, name: str, ndim: int) -> NDArray[np.float64]:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        raise DataError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if np.isnan(a).any():
        raise DataError(f"{name} contains NaN")
    return a


def _int_array(x: ArrayLike, name: str, ndim: int) -> NDArray[np.int64]:
    a = np.asarray(x)
    if a.ndim != ndim:
        raise DataError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _bool_mask(x: ArrayLike, name: str, shape: tuple[int, ...]) -> NDArray[np.bool_]:
    a = np.asarray(x)
    if a.dtype != np.bool_ or a.shape != shape:
        raise DataError(f"{name} must be bool of shape {shape}, got {a.dtype} {a.shape}")
    return a


def _check_items(items: NDArray[np.int64], name: str, num_items: int) -> None:
    if items.size and (items.min() < 0 or items.max() >= num_items):
        raise DataError(f"{name} has item indices outside [0, {num_items})")


def _ranks(ranks: ArrayLike) -> NDArray[np.int64]:
    r = _int_array(ranks, "ranks", 1)
    if r.size and r.min() < 0:
        raise DataError("ranks must be non-negative")
    return r


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise DataError(f"k must be a positive integer, got {k!r}")


def _mean(values: NDArray[np.float64], what: str) -> float:
    if values.size == 0:
        message = f"{what} is undefined for zero users; returning nan"
        warnings.warn(message, DataWarning, stacklevel=3)
        return float("nan")
    return float(values.mean())


# --------------------------------------------------------------------------- ranks


def sampled_rank(pos_scores: ArrayLike, neg_scores: ArrayLike) -> NDArray[np.int64]:
    """Rank each user's held-out item among its sampled negatives.

    Parameters
    ----------
    pos_scores : (U,) float array
        Score of each user's held-out item.
    neg_scores : (U, n) float array
        Scores of the ``n`` sampled negative items of each user.

    Returns
    -------
    (U,) int64 array
        0-based rank: the number of negatives scoring ``>=`` the held-out item, so ties
        count against the held-out item.

    Raises
    ------
    DataError
        On NaN scores or mismatched shapes.
    """
    pos = _float_array(pos_scores, "pos_scores", 1)
    neg = _float_array(neg_scores, "neg_scores", 2)
    if neg.shape[0] != pos.shape[0]:
        raise DataError(f"pos_scores has {pos.shape[0]} users, neg_scores has {neg.shape[0]}")
    return (neg >= pos[:, None]).sum(axis=1, dtype=np.int64)


def full_ranking_ranks(
    scores: ArrayLike, target_items: ArrayLike, exclude_mask: ArrayLike
) -> NDArray[np.int64]:
    """Rank each user's target item among all items not excluded for that user.

    Parameters
    ----------
    scores : (U, I) float array
        Score of every item for every user.
    target_items : (U,) int array
        Held-out item of each user.
    exclude_mask : (U, I) bool array
        ``True`` for items that are not candidates (the user's training items).

    Returns
    -------
    (U,) int64 array
        0-based rank: the number of other non-excluded items scoring ``>=`` the target,
        so ties count against the target.

    Raises
    ------
    DataError
        On NaN scores, mismatched shapes, out-of-range targets, or an excluded target.
    """
    s = _float_array(scores, "scores", 2)
    num_users, num_items = s.shape
    targets = _int_array(target_items, "target_items", 1)
    excluded = _bool_mask(exclude_mask, "exclude_mask", s.shape)
    if len(targets) != num_users:
        raise DataError(f"target_items has {len(targets)} users, scores has {num_users}")
    _check_items(targets, "target_items", num_items)
    rows = np.arange(num_users)
    bad = np.flatnonzero(excluded[rows, targets])
    if bad.size:
        raise DataError(f"target item is excluded for {bad.size} user(s), e.g. row {bad[0]}")
    target_scores = s[rows, targets]
    # The target itself satisfies ``>=`` and is never excluded, hence the ``- 1``.
    return ((s >= target_scores[:, None]) & ~excluded).sum(axis=1, dtype=np.int64) - 1


def top_k_items(scores: ArrayLike, exclude_mask: ArrayLike, k: int) -> NDArray[np.int64]:
    """Return each user's ``k`` highest-scoring non-excluded items, best first.

    Parameters
    ----------
    scores : (U, I) float array
        Score of every item for every user.
    exclude_mask : (U, I) bool array
        ``True`` for items that must never be recommended (the user's training items).
    k : int
        List length.

    Returns
    -------
    (U, k) int64 array
        Item indices; equal scores are ordered by lower item index.

    Raises
    ------
    DataError
        On NaN scores, mismatched shapes, or a user with fewer than ``k`` candidates.
    """
    _check_k(k)
    s = _float_array(scores, "scores", 2)
    excluded = _bool_mask(exclude_mask, "exclude_mask", s.shape)
    candidates = (~excluded).sum(axis=1)
    if k > s.shape[1] or (candidates.size and candidates.min() < k):
        raise DataError(f"some user has fewer than k={k} non-excluded items")
    # Stable sort: non-excluded first, then by descending score, then by item index.
    order = np.lexsort((-s, excluded), axis=-1)
    return order[:, :k].astype(np.int64)


# --------------------------------------------------------------------------- accuracy


def hits_at_k(ranks: ArrayLike, k: int) -> NDArray[np.float64]:
    """Per-user hit indicator: ``1.0`` where ``rank < k`` else ``0.0``.

    Parameters
    ----------
    ranks : (U,) int array
        0-based ranks from :func:`sampled_rank` or :func:`full_ranking_ranks`.
    k : int
        Cut-off.

    Returns
    -------
    (U,) float64 array
        Hits; their sum over a silo is what federated evaluation sends.
    """
    _check_k(k)
    return (_ranks(ranks) < k).astype(np.float64)


def dcg_at_k(ranks: ArrayLike, k: int) -> NDArray[np.float64]:
    """Per-user DCG@k of a single relevant item: ``1 / log2(rank + 2)`` if ``rank < k``.

    With one relevant item the ideal DCG is 1, so this is also the per-user NDCG@k,
    for both sampled and full ranking.

    Parameters
    ----------
    ranks : (U,) int array
        0-based ranks.
    k : int
        Cut-off.

    Returns
    -------
    (U,) float64 array
        Per-user gains in ``[0, 1]``.
    """
    _check_k(k)
    r = _ranks(ranks)
    return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


def hit_rate_at_k(ranks: ArrayLike, k: int) -> float:
    """Mean of :func:`hits_at_k` (HR@k); ``nan`` with a :class:`DataWarning` for no users."""
    return _mean(hits_at_k(ranks, k), f"HR@{k}")


def ndcg_at_k(ranks: ArrayLike, k: int) -> float:
    """Mean of :func:`dcg_at_k` (NDCG@k); ``nan`` with a :class:`DataWarning` for no users."""
    return _mean(dcg_at_k(ranks, k), f"NDCG@{k}")


def recall_at_k(ranks: ArrayLike, k: int) -> float:
    """Mean Recall@k over users; ``nan`` with a :class:`DataWarning` for no users.

    With one held-out item per user, Recall@k equals HR@k (its per-user values are
    :func:`hits_at_k`); it is provided under its own name for full-ranking reports.
    """
    return _mean(hits_at_k(ranks, k), f"Recall@{k}")


# --------------------------------------------------------------------------- coverage


def item_exposure_counts(top_k: ArrayLike, num_items: int) -> NDArray[np.int64]:
    """Count how often each catalogue item appears in the recommendation lists.

    Parameters
    ----------
    top_k : (U, k) int array
        Recommendation lists, e.g. from :func:`top_k_items`.
    num_items : int
        Catalogue size ``I``.

    Returns
    -------
    (I,) int64 array
        Exposure histogram; silos' histograms can be summed and passed to
        :func:`coverage_from_counts`.
    """
    if num_items < 1:
        raise DataError(f"num_items must be positive, got {num_items}")
    lists = _int_array(top_k, "top_k", 2)
    _check_items(lists, "top_k", num_items)
    return np.bincount(lists.ravel(), minlength=num_items).astype(np.int64)


def coverage_from_counts(counts: ArrayLike) -> float:
    """Fraction of catalogue items with a non-zero exposure count.

    Parameters
    ----------
    counts : (I,) int array
        Exposure histogram from :func:`item_exposure_counts` (possibly summed over silos).

    Returns
    -------
    float
        Coverage in ``[0, 1]``; ``nan`` with a :class:`DataWarning` when no item was
        recommended at all.
    """
    c = _int_array(counts, "counts", 1)
    if c.size == 0 or c.min() < 0:
        raise DataError("counts must be a non-empty histogram of non-negative integers")
    if c.sum() == 0:
        message = "coverage is undefined without recommendations; returning nan"
        warnings.warn(message, DataWarning, stacklevel=2)
        return float("nan")
    return float((c > 0).mean())


def catalogue_coverage(top_k: ArrayLike, num_items: int) -> float:
    """Fraction of the ``num_items`` catalogue items appearing in at least one list.

    Parameters
    ----------
    top_k : (U, k) int array
        Recommendation lists.
    num_items : int
        Catalogue size.

    Returns
    -------
    float
        Coverage in ``[0, 1]``; ``nan`` with a :class:`DataWarning` for no lists.
    """
    return coverage_from_counts(item_exposure_counts(top_k, num_items))


# --------------------------------------------------------------------------- popularity


def arp_per_user(top_k: ArrayLike, item_popularity: ArrayLike) -> NDArray[np.float64]:
    """Mean popularity of each user's recommendation list.

    Parameters
    ----------
    top_k : (U, k) int array
        Recommendation lists, ``k >= 1``.
    item_popularity : (I,) float array
        Popularity of each item: its training interaction count divided by the number
        of users (Abdollahpouri et al.).

    Returns
    -------
    (U,) float64 array
        Per-user average recommendation popularity.
    """
    pop = _float_array(item_popularity, "item_popularity", 1)
    lists = _int_array(top_k, "top_k", 2)
    if lists.shape[1] == 0:
        raise DataError("top_k lists must hold at least one item")
    _check_items(lists, "top_k", len(pop))
    return pop[lists].mean(axis=1)


def average_recommendation_popularity(top_k: ArrayLike, item_popularity: ArrayLike) -> float:
    """Average Recommendation Popularity (ARP): mean of :func:`arp_per_user` over users.

    Returns ``nan`` with a :class:`DataWarning` for no users.
    """
    return _mean(arp_per_user(top_k, item_popularity), "ARP")


# --------------------------------------------------------------------------- fairness


def _lowest_group_mean(counts: NDArray[np.float64], sums: NDArray[np.float64]) -> float:
    """Mean value of the first ``QUINTILE`` of users, splitting the boundary bucket pro rata."""
    mass = QUINTILE * counts.sum()
    before = np.cumsum(counts) - counts
    share = np.divide(mass - before, counts, out=np.zeros_like(counts), where=counts > 0)
    return float((np.clip(share, 0.0, 1.0) * sums).sum() / mass)


def _quintile_gap(counts: NDArray[np.float64], sums: NDArray[np.float64]) -> float:
    if counts.sum() == 0:
        message = "quintile gap is undefined for zero users; returning nan"
        warnings.warn(message, DataWarning, stacklevel=3)
        return float("nan")
    return _lowest_group_mean(counts, sums) - _lowest_group_mean(counts[::-1], sums[::-1])


def _hits_activity(
    hits: ArrayLike, activity: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    h = _float_array(hits, "hits", 1)
    a = _int_array(activity, "activity", 1)
    if len(h) != len(a):
        raise DataError(f"hits has {len(h)} users, activity has {len(a)}")
    if a.size and a.min() < 0:
        raise DataError("activity must be non-negative")
    return h, a


def activity_quintile_gap(hits: ArrayLike, activity: ArrayLike) -> float:
    """Hit-rate gap between the least and the most active 20% of users.

    Users are ordered by activity; the lowest and highest ``0.2 * U`` users form the two
    groups. Users sharing the activity level that straddles a group boundary all count
    with the same fractional weight (pro rata), so the result does not depend on how
    ties are ordered and equals :func:`quintile_gap_from_histogram` on pooled histograms.

    Parameters
    ----------
    hits : (U,) float array
        Per-user metric, e.g. :func:`hits_at_k` with ``k=10``.
    activity : (U,) int array
        Per-user training interaction count.

    Returns
    -------
    float
        ``mean(least active 20%) - mean(most active 20%)``: positive when the least
        active users are served better. ``nan`` with a :class:`DataWarning` for no users.
    """
    h, a = _hits_activity(hits, activity)
    _, level = np.unique(a, return_inverse=True)
    return _quintile_gap(np.bincount(level).astype(np.float64), np.bincount(level, weights=h))  # type: ignore[arg-type]


def activity_histogram_sums(
    hits: ArrayLike, activity: ArrayLike, max_activity: int
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Per-activity-level user counts and hit sums, summable across silos.

    Parameters
    ----------
    hits : (U,) float array
        Per-user metric.
    activity : (U,) int array
        Per-user training interaction count; values above ``max_activity`` are clipped
        into the last bucket. Choose ``max_activity`` at least the largest activity for
        the pooled gap to equal :func:`activity_quintile_gap`.
    max_activity : int
        Largest bucket index ``A``.

    Returns
    -------
    counts : (A+1,) int64 array
        Number of users per activity level.
    hit_sums : (A+1,) float64 array
        Sum of ``hits`` per activity level.
    """
    if max_activity < 0:
        raise DataError(f"max_activity must be non-negative, got {max_activity}")
    h, a = _hits_activity(hits, activity)
    bucket = np.minimum(a, max_activity)
    counts = np.bincount(bucket, minlength=max_activity + 1).astype(np.int64)
    return counts, np.bincount(bucket, weights=h, minlength=max_activity + 1)  # type: ignore[return-value]


def quintile_gap_from_histogram(counts: ArrayLike, hit_sums: ArrayLike) -> float:
    """The :func:`activity_quintile_gap` computed from (pooled) activity histograms.

    Parameters
    ----------
    counts : (A+1,) int array
        Users per activity level, from :func:`activity_histogram_sums` summed over silos.
    hit_sums : (A+1,) float array
        Hit sums per activity level, likewise summed.

    Returns
    -------
    float
        ``mean(least active 20%) - mean(most active 20%)``, splitting boundary buckets
        pro rata; ``nan`` with a :class:`DataWarning` when ``counts`` sums to zero.
    """
    c = _int_array(counts, "counts", 1)
    s = _float_array(hit_sums, "hit_sums", 1)
    if len(c) != len(s) or (c.size and c.min() < 0):
        raise DataError("counts and hit_sums need equal length and non-negative counts")
    return _quintile_gap(c.astype(np.float64), s)
