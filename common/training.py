"""Local (non-private) training of an embedding recommender on one set of users.

Used by a silo's ClientApp each round and by the centralized baseline. Training
negatives are drawn from items outside the user's *training* set, so held-out
validation/test items can be drawn as negatives: their identity never shapes
training.
"""

from __future__ import annotations

import time
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
