"""Local (non-private) training of an embedding recommender on one set of users.

Used by a silo's ClientApp each round and by the centralized baseline. Training
negatives are drawn from items outside the user's *training* set, so held-out
validation/test items can be drawn as negatives: their identity never shapes
training. DP training draws some negatives with :func:`keyed_integers`, a
counter-based generator whose draws for one record are a function of a key and
that record alone (see :mod:`common.privacy.local`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from common.config import TrainSettings
from common.data.split import UserSplit
from common.models import Recommender


@dataclass(frozen=True, slots=True)
class TrainStats:
    """What one call of :func:`train_epochs` did."""

    num_examples: int  # training positives seen (per epoch)
    num_steps: int
    mean_loss: float
    seconds: float


def train_item_keys(split: UserSplit) -> NDArray[np.int64]:
    """Sorted unique ``user * num_items + item`` keys of the training positives."""
    return np.unique(split.train_user * split.num_items + split.train_item)


def sample_train_negatives(
    keys: NDArray[np.int64],
    users: NDArray[np.int64],
    k: int,
    num_items: int,
    rng: np.random.Generator,
    high: int | None = None,
) -> NDArray[np.int64]:
    """Draw ``k`` items per row of ``users`` uniformly among that user's non-train items.

    Rejection sampling against the sorted training keys; returns (len(users), k).
    Negatives of one row may repeat (sampling with replacement, as in NCF). Only
    items below ``high`` (default ``num_items``) are drawn: audit canary items sit
    at the end of the catalogue and are never negatives.
    """
    high = num_items if high is None else high
    negatives = rng.integers(0, high, size=(len(users), k))
    while True:
        query = users[:, None] * num_items + negatives
        pos = np.searchsorted(keys, query).clip(max=len(keys) - 1)
        bad = keys[pos] == query
        if not bad.any():
            return negatives
        negatives[bad] = rng.integers(0, high, size=int(bad.sum()))


# SplitMix64 (Steele, Lea & Flood, OOPSLA 2014): the increment and the finaliser's
# multipliers. The finaliser is a bijection of uint64 with full avalanche.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """SplitMix64's finaliser applied to ``x + golden`` (wrapping uint64 arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def keyed_integers(
    key: int, parts: Sequence[NDArray[np.integer] | int], high: NDArray[np.integer] | int
) -> NDArray[np.int64]:
    """Integers uniform in ``[0, high)``, each a function of ``key`` and its ``parts`` alone.

    A counter-based generator: entry ``e`` of the broadcast of ``parts`` is
    ``h(key, parts[0][e], parts[1][e], …) mod high`` with ``h`` SplitMix64's
    finaliser chained over the parts. So a draw does not depend on how many other
    draws are made, or in what order: one record's draws stay bit-identical when
    another record is added or removed. The bias of the modulo is below
    ``high / 2**64``. Not a cryptographic generator: used for training negatives,
    never for noise.

    Parameters
    ----------
    key : int
        A 64-bit key (a fresh random one per step or round).
    parts : sequence of int arrays or ints
        Non-negative identifiers of each draw (user, item, slot, attempt, …),
        broadcast together.
    high : int or int array
        Exclusive upper bound (≥ 1), broadcast with the parts.
    """
    arrays = [np.asarray(p).astype(np.uint64) for p in parts]
    with np.errstate(over="ignore"):
        h = _mix64(np.asarray(np.uint64(key % 2**64)))
        for part in arrays:
            h = _mix64(h ^ part)
    bound = np.asarray(high).astype(np.uint64)
    return np.asarray(h % bound).astype(np.int64)


def interaction_negatives(
    key: int,
    users: NDArray[np.int64],
    positives: NDArray[np.int64],
    k: int,
    num_items: int,
    high: int | None = None,
) -> NDArray[np.int64]:
    """``k`` negatives (B, k) for each interaction (``users[b]``, ``positives[b]``).

    Each negative is uniform over the items below ``high`` (default ``num_items``)
    except the interaction's own positive, and is a function of ``key``, that user,
    that item and its slot only: it never looks at the user's other interactions.
    Under interaction-level DP this keeps one interaction's removal from changing
    any other interaction's negatives. A positive at or above ``high`` (an audit
    canary) excludes nothing. Negatives may repeat and may be other positives of the
    same user.
    """
    high = num_items if high is None else high
    if high < 2:
        raise ValueError(f"negatives need at least 2 items below high, got {high}")
    slots = np.arange(k, dtype=np.int64)[None, :]
    pos = positives[:, None]
    inside = pos < high
    draws = keyed_integers(key, (users[:, None], pos, slots), np.where(inside, high - 1, high))
    # Skip over the positive: uniform over the other high - 1 items.
    return draws + (inside & (draws >= pos))


def batch_loss(
    model: Recommender,
    users: Tensor,
    items: Tensor,
    settings: TrainSettings,
) -> Tensor:
    """Per-sample loss (B,) for rows ``items[:, 0]`` = positive, ``items[:, 1:]`` = negatives.

    ``bce``: binary cross-entropy over the positive and its k negatives (summed).
    ``bpr``: mean over negatives of ``-log sigmoid(s_pos - s_neg)``. Both add
    ``l2 * ||touched embedding rows||^2``.
    """
    logits = model(users, items)  # (B, 1 + k)
    return interaction_loss(logits, settings.loss) + settings.l2 * model.l2_terms(users, items)


def interaction_loss(logits: Tensor, loss: str) -> Tensor:
    """Loss of each positive from logits (..., 1 + k): column 0 positive, the rest negatives."""
    if loss == "bce":
        labels = torch.zeros_like(logits)
        labels[..., 0] = 1.0
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(-1)
    return -F.logsigmoid(logits[..., :1] - logits[..., 1:]).mean(-1)


def train_epochs(
    model: Recommender,
    split: UserSplit,
    settings: TrainSettings,
    *,
    epochs: int,
    rng: np.random.Generator,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainStats:
    """Train ``model`` for ``epochs`` passes over the training positives of ``split``.

    A new Adam optimizer is created unless one is passed (the centralized baseline
    keeps one across epochs).
    """
    start = time.perf_counter()
    model.train()
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=settings.lr)
    keys = train_item_keys(split)
    n = split.num_train
    total, steps = 0.0, 0
    for _ in range(epochs):
        order = rng.permutation(n)
        negatives = sample_train_negatives(
            keys, split.train_user[order], settings.num_negatives, split.num_items, rng
        )
        items = np.concatenate([split.train_item[order, None], negatives], axis=1)
        users_t = torch.from_numpy(split.train_user[order]).to(device)
        items_t = torch.from_numpy(items).to(device)
        for lo in range(0, n, settings.batch_size):
            hi = lo + settings.batch_size
            users, batch = users_t[lo:hi], items_t[lo:hi]
            loss = batch_loss(model, users, batch, settings).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
    mean_loss = total / steps if steps else float("nan")
    return TrainStats(n, steps, mean_loss, time.perf_counter() - start)
