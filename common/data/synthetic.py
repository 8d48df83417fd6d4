"""Seeded synthetic interaction logs with a latent-factor ground truth."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.data.schema import Interactions
from common.errors import DataError

_CHUNK_ELEMENTS = 1 << 22  # users per chunk x items: bounds the (B, I) score matrix
_START = 1_600_000_000  # epoch seconds of the earliest possible interaction
_SPREAD = 90 * 86_400  # users start at a uniform time within 90 days
_MEAN_GAP = 86_400  # mean seconds between a user's interactions


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """Settings of the synthetic generator.

    Parameters
    ----------
    num_users, num_items : int
        Number of users and size of the item catalogue.
    dim : int
        Dimension of the ground-truth latent factors.
    num_categories : int
        Number of item categories; items are spread evenly over them.
    mean_interactions : float
        Mean of the lognormal distribution of interactions per user, before the
        counts are clipped to ``[min_interactions, num_items // 2]``.
    min_interactions : int
        Fewest interactions of any user.
    popularity_exponent : float
        Exponent ``a`` of the Zipf-like item popularity ``rank ** -a``; 0 disables it.
    temperature : float
        Softmax temperature of the user-item affinities; lower is more
        preference-driven and easier to learn.
    seed : int
        Seed of every random draw.
    """

    num_users: int = 2000
    num_items: int = 1000
    dim: int = 16
    num_categories: int = 10
    mean_interactions: float = 40.0
    min_interactions: int = 5
    popularity_exponent: float = 1.0
    temperature: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject values out of range, naming the field."""
        _check_int("num_users", self.num_users, 1)
        _check_int("dim", self.dim, 1)
        _check_int("min_interactions", self.min_interactions, 1)
        _check_int("num_items", self.num_items, 2 * self.min_interactions)
        _check_int("num_categories", self.num_categories, 1, self.num_items)
        _check_int("seed", self.seed, 0)
        _check_float(
            "mean_interactions",
            self.mean_interactions,
            self.min_interactions,
            self.num_items // 2,
        )
        _check_float("popularity_exponent", self.popularity_exponent, 0.0)
        _check_float("temperature", self.temperature, 0.0, inclusive=False)


def generate_synthetic(spec: SyntheticSpec) -> Interactions:
    """Generate an implicit-feedback log from a latent-factor model.

    Items belong to one category each; an item's factor is its category centroid
    plus noise. A user's factor mixes the centroids of one or two preferred
    categories plus noise. Each user draws their interactions without replacement
    from ``softmax(user . item / temperature + log popularity)``, using the Gumbel
    top-k trick. Their timestamps increase in a random order of the drawn items,
    so the latest item follows the same preference as the earlier ones.

    Parameters
    ----------
    spec : SyntheticSpec
        Generator settings.

    Returns
    -------
    Interactions
        Rows grouped by user, in time order within a user. User ``u`` is ``"u{u}"``
        and item ``i`` is ``"i{i}"``; ``item_category`` holds each item's category.
    """
    rng = np.random.default_rng(spec.seed)
    n_users, n_items, dim = spec.num_users, spec.num_items, spec.dim
    centroids = rng.standard_normal((spec.num_categories, dim)) / math.sqrt(dim)
    category = rng.permutation(np.arange(n_items) % spec.num_categories)
    noise = rng.standard_normal((n_items, dim)) / math.sqrt(dim)
    item_factors = centroids[category] + 0.5 * noise  # (I, D)
    user_factors = _user_factors(rng, centroids, n_users)  # (U, D)
    rank = rng.permutation(n_items) + 1  # popularity rank of each item; 1 is the top
    log_popularity = (-spec.popularity_exponent * np.log(rank)).astype(np.float32)

    sigma = 1.0
    mu = math.log(spec.mean_interactions) - sigma**2 / 2  # lognormal with that mean
    counts = np.clip(
        np.rint(rng.lognormal(mu, sigma, n_users)),
        spec.min_interactions,
        n_items // 2,
    ).astype(np.int64)  # (U,)

    # Users sorted by count share a chunk with users of similar count, so each
    # chunk's top-k is barely wider than any of its users needs.
    by_count = np.argsort(counts, kind="stable")
    chunk = max(1, _CHUNK_ELEMENTS // n_items)
    drawn_users, drawn_items = [], []
    for start in range(0, n_users, chunk):
        users = by_count[start : start + chunk]  # (B,)
        logits = (user_factors[users] @ item_factors.T).astype(np.float32)  # (B, I)
        logits /= np.float32(spec.temperature)
        logits += log_popularity
        # Gumbel noise -log(E), E ~ Exp(1); E == 0 gives +inf, a harmless tie.
        with np.errstate(divide="ignore"):
            logits -= np.log(rng.standard_exponential(logits.shape, dtype=np.float32))
        k = int(counts[users[-1]])  # the chunk's largest count
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]  # (B, k), unordered
        order = np.argsort(-np.take_along_axis(logits, top, axis=1), axis=1)
        top = np.take_along_axis(top, order, axis=1)  # (B, k), best first
        drawn_items.append(top[np.arange(k) < counts[users, None]])
        drawn_users.append(np.repeat(users, counts[users]))

    # Group by user in a random order within each user; times increase along it.
    user_idx = np.concatenate(drawn_users)
    order = np.lexsort((rng.random(len(user_idx)), user_idx))
    user_idx, item_idx = user_idx[order], np.concatenate(drawn_items)[order]
    gaps = rng.exponential(_MEAN_GAP, len(user_idx)).astype(np.int64) + 1
    elapsed = np.cumsum(gaps)
    first_row = np.cumsum(counts) - counts  # (U,)
    elapsed -= np.repeat(elapsed[first_row], counts)  # 0 at each user's first item
    start_time = _START + rng.integers(0, _SPREAD, n_users)  # (U,)
    return Interactions(
        user_idx=user_idx,
        item_idx=item_idx,
        timestamp=start_time[user_idx] + elapsed,
        user_ids=np.array([f"u{u}" for u in range(n_users)], dtype=object),
        item_ids=np.array([f"i{i}" for i in range(n_items)], dtype=object),
        item_category=category.astype(np.int64),
        source=f"synthetic:{spec}",
    )


def _user_factors(
    rng: np.random.Generator, centroids: NDArray[np.float64], n_users: int
) -> NDArray[np.float64]:
    """Mix the centroids of one or two preferred categories per user, plus noise."""
    n_categories, dim = centroids.shape
    first = rng.integers(n_categories, size=n_users)
    second = rng.integers(n_categories, size=n_users)
    # Half the users lean on a second category with a weight in [0, 0.5].
    weight = np.where(rng.random(n_users) < 0.5, rng.uniform(0.0, 0.5, n_users), 0.0)
    weight = weight[:, None]  # (U, 1)
    mixed = (1 - weight) * centroids[first] + weight * centroids[second]  # (U, D)
    return mixed + 0.5 * rng.standard_normal((n_users, dim)) / math.sqrt(dim)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise unless `value` is an int (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"SyntheticSpec.{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise DataError(f"SyntheticSpec.{name} must be {bound}, got {value}")


def _check_float(
    name: str,
    value: object,
    low: float,
    high: float = math.inf,
    *,
    inclusive: bool = True,
) -> None:
    """Raise unless `value` is a finite real number (not a bool) in range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"SyntheticSpec.{name} must be a number, got {value!r}")
    below = value < low or (value == low and not inclusive)
    if not math.isfinite(value) or below or value > high:
        bound = f"{'[' if inclusive else '('}{low}, {high}]"
        raise DataError(f"SyntheticSpec.{name} must be finite in {bound}, got {value}")
