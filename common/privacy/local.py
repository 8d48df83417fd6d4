"""Local DP training of one silo: Poisson sampling over privacy units, DP-SGD steps.

Unit ``user``: one DP sample is one user — up to ``max_positives`` of their training
positives (a random subset when they have more) with ``k`` negatives each, padded
and masked; the per-sample loss is the sum over those positives. Users' own rows
are trained without noise (they never leave the silo; joint DP).

Unit ``interaction``: one DP sample is one training interaction (a positive and
its negatives); a neighbouring silo has one interaction replaced by a null record. A user's row then
depends on all of their interactions, and every other interaction's item gradient
depends on that row, so un-noised user rows would leak across records: in this mode
user rows are clipped and noised like item rows, and no rows are refit. Each
interaction's negatives exclude only its own positive and are keyed by the
interaction itself (:func:`step_items`), so no other sample of a step changes when
one interaction is removed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from common.config import TrainSettings
from common.data.split import UserSplit
from common.models import Recommender, feature_rows
from common.privacy.accounting import MechanismUse
from common.privacy.dpsgd import NoiseSource, SparseDPSGD
from common.training import (
    TrainStats,
    interaction_loss,
    interaction_negatives,
    keyed_integers,
    sample_train_negatives,
    train_item_keys,
)

Unit = Literal["user", "interaction"]


class UnitSampler:
    """Poisson batches over a silo's privacy units.

    Parameters
    ----------
    split : UserSplit
        The silo's training interactions.
    unit : "user" | "interaction"
        What one DP sample is.
    expected_batch_size : int
        B̄; the sampling rate is q = min(1, B̄ / N) for N units.
    max_positives : int
        User unit: positives per user per step (a random subset when more).
    """

    def __init__(self, split: UserSplit, unit: Unit, expected_batch_size: int, max_positives: int) -> None:
        order = np.argsort(split.train_user, kind="stable")
        self.users_sorted = split.train_user[order]
        self.items_sorted = split.train_item[order]
        self.unit = unit
        self.max_positives = max_positives if unit == "user" else 1
        if unit == "user":
            # The roster: every user of the silo, also one without training interactions
            # (sampled like any other, contributing exactly zero). Under the zero-out
            # relation N is public: it must not depend on anyone's interactions.
            self.units = np.arange(split.num_users, dtype=np.int64)
            self.starts = np.searchsorted(self.users_sorted, self.units, side="left")
            self.counts = np.bincount(self.users_sorted, minlength=split.num_users).astype(np.int64)
        else:
            self.units = np.arange(len(self.users_sorted))
        self.population = len(self.units)
        if self.population == 0 or not len(self.users_sorted):
            raise ValueError("the silo has no training interactions")
        self.sample_rate = min(1.0, expected_batch_size / self.population)
        self.expected_batch_size = self.sample_rate * self.population

    def sample(self, rng: np.random.Generator) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.bool_]]:
        """One Poisson batch: users (B,), positives (B, P), mask (B, P)."""
        chosen = np.flatnonzero(rng.random(self.population) < self.sample_rate)
        if self.unit == "interaction":
            users = self.users_sorted[chosen]
            return users, self.items_sorted[chosen, None], np.ones((len(chosen), 1), bool)
        users = self.units[chosen]
        counts = self.counts[chosen]
        width = int(max(1, min(self.max_positives, counts.max()))) if len(chosen) else 1
        positives = np.zeros((len(chosen), width), dtype=np.int64)
        mask = np.zeros((len(chosen), width), dtype=bool)
        for row, (start, count) in enumerate(zip(self.starts[chosen], counts, strict=True)):
            picks = self.items_sorted[start : start + count]
            if count > width:
                picks = rng.choice(picks, size=width, replace=False)
            positives[row, : len(picks)] = picks
            mask[row, : len(picks)] = True
        return users, positives, mask


def step_items(
    unit: Unit,
    train_keys: NDArray[np.int64] | None,
    users: NDArray[np.int64],
    positives: NDArray[np.int64],
    k: int,
    num_items: int,
    rng: np.random.Generator,
    *,
    high: int | None = None,
) -> NDArray[np.int64]:
    """Items (B, P·(1+k)) one DP step reads: each positive followed by its ``k`` negatives.

    Unit ``user``: negatives uniform among the user's non-training items
    (``train_keys``, :func:`~common.training.train_item_keys`), a function of that
    user's data, which is the unit. Unit ``interaction``: negatives uniform over the
    catalogue except the interaction's own positive, keyed by one fresh key from
    ``rng`` per step (:func:`~common.training.interaction_negatives`), so they are a
    function of that interaction alone: removing another interaction of the same
    user changes nothing else in the step. Negatives are drawn below ``high``
    (canary items sit above it).
    """
    batch, width = positives.shape
    if unit == "interaction":
        key = int(rng.integers(0, 2**63))
        negatives = interaction_negatives(key, users, positives[:, 0], k, num_items, high)[:, None, :]
    else:
        if train_keys is None:
            raise ValueError("unit 'user' draws negatives against the training keys: pass them")
        negatives = sample_train_negatives(
            train_keys, np.repeat(users, width), k, num_items, rng, high=high
        ).reshape(batch, width, -1)
    return np.concatenate([positives[..., None], negatives], axis=-1).reshape(batch, -1)


def steps_per_round(sample_rate: float, local_epochs: int) -> int:
    """DP-SGD steps that make ``local_epochs`` expected passes over the units."""
    return max(1, math.ceil(local_epochs / sample_rate - 1e-9))


def per_sample_losses(
    model: Recommender,
    rows: dict[str, Tensor],
    mask: Tensor,
    settings: TrainSettings,
    *,
    item_l2: bool = True,
) -> Tensor:
    """Loss (B,) of each sample: sum over its (unmasked) positives of BCE/BPR + L2.

    ``rows`` hold item rows for (B, P·(1+k)) reads laid out positive-major. A sum
    (not a mean) keeps each read's gradient at full size; clipping to C is what
    bounds a user's total contribution. ``item_l2=False`` leaves out the item rows'
    L2 term (a constant when only user rows are trained).
    """
    batch, width = mask.shape
    logits = model.score_rows(rows).reshape(batch, width, -1)  # (B, P, 1+k)
    loss = interaction_loss(logits, settings.loss)
    weights = mask.to(loss.dtype)
    user_rows = {n: rows[n] for n in model.user_tables}
    item_rows = {n: rows[n].reshape(batch, width, -1, rows[n].shape[-1]) for n in model.item_tables}
    user_l2 = sum(
        (r.pow(2).sum(-1) for n, r in user_rows.items() if n in model.l2_tables), torch.zeros(batch, device=mask.device)
    )
    if item_l2:
        loss = loss + settings.l2 * sum(
            (r.pow(2).sum((-2, -1)) for n, r in item_rows.items() if n in model.l2_tables),
            torch.zeros(batch, width, device=mask.device),
        )
    return (weights * loss).sum(1) + settings.l2 * user_l2


# The refit's item reads per block of users: small blocks waste less on users who
# have no step left, and keep elementwise kernels on one thread (grain 32768).
_REFIT_READS = 1 << 13
# Tags that keep the refit's permutation and negative draws apart.
_PERMUTE, _NEGATIVE = 0, 1


def fit_user_rows(
    model: Recommender,
    split: UserSplit,
    settings: TrainSettings,
    *,
    epochs: int,
    lr: float,
    width: int,
    key: int,
    device: torch.device,
    high: int | None = None,
) -> None:
    """Fit users' own rows to the current shared model, each user on their own data alone.

    Each epoch, user u makes ⌈n_u / ``width``⌉ plain SGD steps (learning rate
    ``lr``) over a permutation of their n_u training positives: step s follows the
    gradient of the *sum* of the losses (BCE/BPR and L2, as in the DP steps) of
    positives s·width … (s+1)·width − 1, each with ``settings.num_negatives``
    negatives among u's non-training items below ``high``. The permutation and the
    negatives are drawn by :func:`~common.training.keyed_integers` keyed by
    (``key``, epoch, u, position), never from a shared stream. The shared parameters
    are read, never changed.

    Notes
    -----
    Joint DP (Kearns et al., ITCS 2014, https://arxiv.org/abs/1207.4084; the
    billboard lemma of Hsu et al., STOC 2014): user u's row must be a function of
    u's data and of released parameters only. Nothing here couples users: losses
    are per-user sums (no batch mean), SGD keeps no state (``torch.optim.Adam``
    moves every row with its momentum at every step, and ``SparseAdam`` keeps one
    step count per table for its bias correction, so in both a row's update depends
    on how many steps other users take), and draws are keyed by the user. Users are
    processed in fixed blocks of user indices, all of a block's rows in every step
    (those without a positive left are masked and do not move), so a row's place in
    every tensor is fixed by its index: vectorised kernels round a value differently
    in a SIMD body and a scalar tail, and with moving rows another user's data could
    still change a row's last bits. Under user-level DP the refit needs no noise:
    the row never leaves the silo, and the user's later contribution to shared
    updates is clipped.
    """
    if lr == 0.0 or epochs == 0 or split.num_train == 0:
        return
    order = np.argsort(split.train_user, kind="stable")
    users_sorted, items_sorted = split.train_user[order], split.train_item[order]
    counts = np.bincount(users_sorted, minlength=split.num_users)  # (U,) by user index
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(users_sorted)) - starts[users_sorted]  # position within its user
    slot, col = rank // width, rank % width
    steps_of = -(-counts // width)  # (U,) steps of each user per epoch
    train_keys = train_item_keys(split)
    k = settings.num_negatives
    chunk = max(1, _REFIT_READS // (width * (1 + k)))
    for epoch in range(epochs):
        noise = keyed_integers(key, (_PERMUTE, epoch, users_sorted, rank), 2**63)
        items = items_sorted[np.lexsort((noise, users_sorted))]  # a random order within each user
        for lo in range(0, split.num_users, chunk):
            # A fixed block of user indices: each row's position in every tensor is its
            # index mod chunk, whatever the other users' data.
            hi = min(lo + chunk, split.num_users)
            users = np.arange(lo, hi, dtype=np.int64)
            block = slice(starts[lo], starts[hi - 1] + counts[hi - 1])
            for s in range(int(steps_of[lo:hi].max())):
                here = slot[block] == s
                positives = np.zeros((hi - lo, width), dtype=np.int64)
                mask = np.zeros((hi - lo, width), dtype=bool)
                positives[users_sorted[block][here] - lo, col[block][here]] = items[block][here]
                mask[users_sorted[block][here] - lo, col[block][here]] = True
                negatives = _user_negatives(train_keys, users, width, k, split.num_items, key, (epoch, s), high)
                _refit_step(model, lr, settings, users, positives, mask, negatives, device)


def _user_negatives(
    train_keys: NDArray[np.int64],
    users: NDArray[np.int64],
    width: int,
    k: int,
    num_items: int,
    key: int,
    step: tuple[int, int],
    high: int | None,
) -> NDArray[np.int64]:
    """Refit negatives (C, width, k): uniform among each user's non-training items below ``high``.

    Draw (u, position, j) of refit step ``step`` = (epoch, slot) is keyed by those
    alone, with one more attempt for each rejection, so it is a function of u's
    training items and the key.
    """
    high = num_items if high is None else high
    shape = (len(users), width, k)
    u = np.broadcast_to(users[:, None, None], shape)
    col = np.broadcast_to(np.arange(width)[None, :, None], shape)
    j = np.broadcast_to(np.arange(k)[None, None, :], shape)
    attempt = np.zeros(shape, dtype=np.int64)
    negatives = keyed_integers(key, (_NEGATIVE, *step, u, col, j, attempt), high)
    while True:
        query = u * num_items + negatives
        found = np.searchsorted(train_keys, query).clip(max=len(train_keys) - 1)
        bad = train_keys[found] == query
        if not bad.any():
            return negatives
        attempt[bad] += 1
        negatives[bad] = keyed_integers(
            key, (_NEGATIVE, *step, u[bad], col[bad], j[bad], attempt[bad]), high
        )


def _refit_step(
    model: Recommender,
    lr: float,
    settings: TrainSettings,
    users: NDArray[np.int64],
    positives: NDArray[np.int64],
    mask: NDArray[np.bool_],
    negatives: NDArray[np.int64],
    device: torch.device,
) -> None:
    """One SGD step of the rows of ``users`` (C, unique) that have positives (C, W) in ``mask``."""
    items = np.concatenate([positives[..., None], negatives], axis=-1).reshape(len(users), -1)
    users_t = torch.from_numpy(users).to(device)
    items_t = torch.from_numpy(items).to(device)
    mask_t = torch.from_numpy(mask).to(device)
    leaves = [getattr(model, n).weight.detach()[users_t].requires_grad_(True) for n in model.user_tables]
    rows = dict(zip(model.user_tables, leaves, strict=True))
    rows.update({n: getattr(model, n).weight.detach()[items_t] for n in model.item_tables})
    rows.update(feature_rows(model, items_t))
    # The sum's gradient for row b is that of user b's own loss sum: no batch mean.
    losses = per_sample_losses(model, rows, mask_t, settings, item_l2=False)  # (C,)
    grads = torch.autograd.grad(losses.sum(), leaves)
    stepping = mask_t.any(1)  # a user without positives in this slot does not move
    with torch.no_grad():
        for name, grad in zip(model.user_tables, grads, strict=True):
            getattr(model, name).weight.index_add_(0, users_t[stepping], grad[stepping], alpha=-lr)


@dataclass(frozen=True, slots=True)
class LocalDPSettings:
    """Mechanism parameters of one silo's DP-SGD."""

    unit: Unit
    noise_multiplier: float
    clip: float
    lr: float
    user_lr: float
    expected_batch_size: int
    max_positives: int
    user_epochs: int = 0  # unit = user: epochs fitting users' own rows (items frozen) first
    user_refit_positives: int | None = None  # positives per refit step of a user (None: max_positives)
    negative_items: int | None = None  # negatives drawn below this item index (None: all)


def dp_train(
    model: Recommender,
    split: UserSplit,
    settings: TrainSettings,
    dp: LocalDPSettings,
    *,
    steps: int,
    rng: np.random.Generator,
    generator: torch.Generator | None = None,
    noise: NoiseSource | None = None,
    device: torch.device,
) -> tuple[TrainStats, MechanismUse]:
    """Run ``steps`` DP-SGD steps; returns training stats and the mechanism use to account.

    ``rng`` draws the Poisson batches and negatives; the Gaussian noise comes from
    ``noise`` (e.g. :class:`~common.privacy.dpsgd.CsprngNormal`) or else from
    ``generator``. All owed lazy noise is added before returning, so the shared
    tables may be released.
    """
    start = time.perf_counter()
    sampler = UnitSampler(split, dp.unit, dp.expected_batch_size, dp.max_positives)
    keys = train_item_keys(split) if dp.unit == "user" else None
    model.to(device).train()
    engine = SparseDPSGD(
        model,
        noise_multiplier=dp.noise_multiplier,
        clip=dp.clip,
        lr=dp.lr,
        expected_batch_size=sampler.expected_batch_size,
        private_tables=model.user_tables if dp.unit == "user" else (),
        private_lr=dp.user_lr,
        generator=generator,
        noise=noise,
    )
    if dp.user_epochs and dp.unit == "user":
        fit_user_rows(
            model,
            split,
            settings,
            epochs=dp.user_epochs,
            lr=dp.user_lr,
            width=dp.user_refit_positives or dp.max_positives,
            key=int(rng.integers(0, 2**63)),
            device=device,
            high=dp.negative_items,
        )
    total, counted, seen = 0.0, 0, 0
    try:
        for _ in range(steps):
            users, positives, mask = sampler.sample(rng)
            items = step_items(
                dp.unit, keys, users, positives, settings.num_negatives, split.num_items, rng, high=dp.negative_items
            )
            users_t = torch.from_numpy(users).to(device)
            items_t = torch.from_numpy(items).to(device)
            mask_t = torch.from_numpy(mask).to(device)
            def losses(rows: dict[str, Tensor], m: Tensor = mask_t) -> Tensor:
                return per_sample_losses(model, rows, m, settings)

            stats = engine.step(users_t, items_t, losses)
            if stats.batch_size:
                total += stats.loss
                counted += 1
                seen += int(mask.sum())
        engine.flush()
    finally:
        engine.close()
    mean_loss = total / counted if counted else math.nan
    use = MechanismUse(dp.noise_multiplier, sampler.sample_rate, steps)
    return TrainStats(seen, steps, mean_loss, time.perf_counter() - start), use
