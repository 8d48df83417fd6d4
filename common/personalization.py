"""A silo's personalization: fine-tune a copy of the model on the silo's own users.

After (or between) federated rounds a silo may adapt the shared model to its users
(``personalize.*``): a copy of the model is trained on the silo's *training*
interactions for up to ``epochs`` epochs, and the silo keeps the epoch (0 = the
global model itself) whose validation HR@K over its own users is best. What the
fine-tune moves (``params``):

* ``item-bias``: MF's item biases only (the silo's own item popularity);
* ``items``: every shared parameter (item tables, biases, MLP tower, output layer);
* ``all``: the shared parameters and the users' own rows.

``method = "ditto"`` (Ditto, Li et al. ICML 2021) instead trains a *personal model*
every round (:func:`ditto_train`): the parameters ``params`` names, started from
the silo's previous personal values, trained for ``train.local-epochs`` epochs on
the silo's training interactions with the proximal term ``prox · ||w - w_g||²``
toward the model the silo received (``w_g``), the other parameters those of the
received model. At evaluation :func:`ditto_select` mixes it with the global model,
``β · w + (1 - β) · w_g`` for β in :data:`MIX_WEIGHTS` (APFL's interpolation, β
chosen per silo on validation).

``method = "recency"`` (MF, hybrid-mf) adapts each user's row to that user's latest training
interactions (:func:`recency_select`): the row ``p_u`` becomes ``p_u + β · r_u``, ``r_u``
the mean of the unit-normalised item rows of the user's last ``m`` training items
(:func:`recent_profile`), so the copy scores ``p_u · q_i + β · r_u · q_i``: a private
score term of each user's own recent history, kept in the silo's copy of the users'
rows; ``(m, β)`` is one choice per silo from :data:`RECENT_ITEMS` × :data:`RECENT_WEIGHTS`
on validation. Nothing shared moves.

Every selection (fine-tune epoch, mixing weight, recency) goes through :func:`keep`: the
global model stays unless the best candidate's validation hits beat it by more than
``margin`` paired standard errors.

The copy never replaces the model a silo trains federated rounds on or sends: the
caller's model is not modified. Negatives are drawn, as in federated training,
among items outside each user's training set (:func:`common.training.train_epochs`),
so the held-out validation and test items never shape the fine-tune; the epoch is
selected on validation only, and test is measured on the selected copy.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from common import metrics
from common.config import PersonalizeSettings, TrainSettings
from common.data.split import NO_ITEM, UserSplit
from common.models import HybridMF, Recommender, is_private
from common.recency import ITEM_ROWS, USER_ROWS, unit_rows
from common.training import TrainStats, batch_loss, sample_train_negatives, train_epochs, train_item_keys

#: Mixing weights β of the personal model tried at evaluation (``method = "ditto"``); β = 0,
#: the global model itself, is always the first candidate.
MIX_WEIGHTS = (0.25, 0.5, 0.75, 1.0)
#: How many of a user's latest training items its recency profile averages (``method = "recency"``).
RECENT_ITEMS = (1, 2, 3, 5, 10)
#: Weights β of the recency profile added to a user's row (``method = "recency"``); β = 0 is the global model.
RECENT_WEIGHTS = (0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True, slots=True)
class FineTuneResult:
    """What :func:`fine_tune` did: the selected copy and the curve it was selected on."""

    model: Recommender  # the personalized copy at the selected epoch
    epoch: int  # selected epoch (0 = no fine-tune was better on validation)
    val_hits: tuple[float, ...]  # validation hits@K of the silo's users after 0, 1, ... epochs
    train_loss: tuple[float, ...]  # mean training loss of fine-tune epochs 1, 2, ...


@dataclass(frozen=True, slots=True)
class MixResult:
    """What :func:`ditto_select` kept: the mixed copy, its weight, and the curve it was chosen on."""

    model: Recommender  # β · personal + (1 - β) · global on the personal parameters
    weight: float  # selected β (0 = the global model)
    val_hits: tuple[float, ...]  # validation hits@K at β = 0 and each of MIX_WEIGHTS


@dataclass(frozen=True, slots=True)
class RecencyResult:
    """What :func:`recency_select` kept: the shifted copy, its (m, β), and the validation hits it was chosen on."""

    model: Recommender  # the copy whose users' rows are p_u + β · r_u (the global model when items == 0)
    items: int  # selected m (0 = the global model)
    weight: float  # selected β (0 = the global model)
    val_hits: tuple[float, ...]  # validation hits@K of the global model, then of each (m, β) in grid order


def keep(global_hits: NDArray[np.float64], candidates: Sequence[NDArray[np.float64]], margin: float) -> int:
    """Which model a silo keeps: 0 for the global one, ``1 + j`` for ``candidates[j]``.

    Each array holds one 0/1 validation hit per user (the same users, in order). The
    best candidate (most hits; the earliest on ties) is kept only if its hits exceed
    the global model's by more than ``margin · sqrt(d)``, ``d`` the number of users
    where exactly one of the two hits: under "no difference" the paired difference
    of hits has variance ``d`` (McNemar's test), so ``margin`` is in standard errors.
    ``margin = 0``: any gain.
    """
    if not candidates:
        return 0
    best = int(np.argmax([float(c.sum()) for c in candidates]))
    chosen = candidates[best]
    gain = float(chosen.sum() - global_hits.sum())
    discordant = int(np.count_nonzero(chosen != global_hits))
    return best + 1 if gain > margin * math.sqrt(discordant) else 0


def tuned_parameters(model: nn.Module, params: str) -> list[str]:
    """Names of the parameters a fine-tune of kind ``params`` moves."""
    names = [name for name, _ in model.named_parameters()]
    if params == "item-bias":
        chosen = [n for n in names if n.startswith("item_bias.")]
    elif params == "items":
        chosen = [n for n in names if not is_private(n)]
    elif params == "all":
        chosen = names
    else:
        raise ValueError(f"personalize.params: unknown kind {params!r}; use item-bias, items or all")
    if not chosen:
        raise ValueError(f"personalize.params: {params!r} names no parameter of {type(model).__name__}")
    return chosen


def fine_tune(
    model: Recommender,
    split: UserSplit,
    settings: PersonalizeSettings,
    train: TrainSettings,
    *,
    k: int,
    rng: np.random.Generator,
    device: torch.device,
) -> FineTuneResult:
    """Fine-tune a copy of ``model`` on ``split``'s training interactions; select on validation.

    Each epoch is one pass of :func:`common.training.train_epochs` (``train``'s batch
    size, loss, negatives and L2) with one Adam optimizer at ``settings.lr`` over the
    parameters :func:`tuned_parameters` names; the others are frozen. After every
    epoch the copy's validation hits@``k`` (sampled protocol) are measured; the
    earliest epoch with the most hits is returned if :func:`keep` prefers it to
    epoch 0 (the global model) at ``settings.margin``. ``model`` itself is not modified.
    """
    tuned = copy.deepcopy(model).to(device)
    moving = set(tuned_parameters(tuned, settings.params))
    for name, parameter in tuned.named_parameters():
        parameter.requires_grad_(name in moving)
    optimizer = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=settings.lr)
    train_settings = dataclasses.replace(train, lr=settings.lr)
    hits = [_val_user_hits(tuned, split, k, device)]
    states = [copy.deepcopy(tuned.state_dict())]
    losses = []
    for _ in range(settings.epochs):
        if split.num_train == 0:
            break
        stats = train_epochs(tuned, split, train_settings, epochs=1, rng=rng, device=device, optimizer=optimizer)
        losses.append(stats.mean_loss)
        hits.append(_val_user_hits(tuned, split, k, device))
        states.append(copy.deepcopy(tuned.state_dict()))
    best_epoch = keep(hits[0], hits[1:], settings.margin)
    tuned.load_state_dict(states[best_epoch])
    for parameter in tuned.parameters():
        parameter.requires_grad_(True)
    tuned.eval()
    return FineTuneResult(tuned, best_epoch, tuple(float(h.sum()) for h in hits), tuple(losses))


def ditto_train(
    personal: Mapping[str, Tensor] | None,
    model: Recommender,
    split: UserSplit,
    settings: PersonalizeSettings,
    train: TrainSettings,
    *,
    rng: np.random.Generator,
    device: torch.device,
) -> tuple[dict[str, Tensor], TrainStats]:
    """One round of a silo's personal model (Ditto); returns its new parameters and the stats.

    The personal model is a copy of ``model`` (the model the silo received: the shared
    parameters and its users' rows) with the parameters :func:`tuned_parameters` names
    taken from ``personal`` (none on the first round: they start at ``model``'s). Those
    are trained for ``train.local_epochs`` epochs of Adam at ``settings.lr`` on the
    silo's training interactions (``train``'s batches, negatives, loss and L2) with
    ``settings.prox · Σ ||w - w_g||²`` over them added to each batch's mean loss,
    ``w_g`` their values in ``model``; the others stay frozen at ``model``'s. Returns
    only the trained parameters (CPU copies). ``model`` is not modified.
    """
    tuned = copy.deepcopy(model).to(device)
    names = tuned_parameters(tuned, settings.params)
    reference = [dict(tuned.named_parameters())[name].detach().clone() for name in names]  # w_g: as received
    if personal is not None:
        unexpected = sorted(set(personal) ^ set(names))
        if unexpected:
            raise ValueError(
                f"personal model: parameters {unexpected} do not match personalize.params {settings.params!r}"
            )
        tuned.load_state_dict(dict(personal), strict=False)
    params = dict(tuned.named_parameters())
    moving = [params[name] for name in names]
    for name, parameter in params.items():
        parameter.requires_grad_(name in names)
    train_settings = dataclasses.replace(train, lr=settings.lr)
    stats = _train_prox(tuned, moving, reference, split, train_settings, settings.prox, rng, device)
    return {name: params[name].detach().cpu().clone() for name in names}, stats


def _train_prox(
    model: Recommender,
    moving: list[nn.Parameter],
    reference: list[Tensor],
    split: UserSplit,
    train: TrainSettings,
    prox: float,
    rng: np.random.Generator,
    device: torch.device,
) -> TrainStats:
    """``train.local_epochs`` epochs of :func:`common.training.train_epochs`' loop plus the proximal term."""
    start = time.perf_counter()
    model.train()
    optimizer = torch.optim.Adam(moving, lr=train.lr)
    keys = train_item_keys(split)
    n = split.num_train
    total, steps = 0.0, 0
    for _ in range(train.local_epochs if n else 0):
        order = rng.permutation(n)
        negatives = sample_train_negatives(keys, split.train_user[order], train.num_negatives, split.num_items, rng)
        items_t = torch.from_numpy(np.concatenate([split.train_item[order, None], negatives], axis=1)).to(device)
        users_t = torch.from_numpy(split.train_user[order]).to(device)
        for lo in range(0, n, train.batch_size):
            hi = lo + train.batch_size
            loss = batch_loss(model, users_t[lo:hi], items_t[lo:hi], train).mean()
            if prox:
                loss = loss + prox * sum(((w - w0) ** 2).sum() for w, w0 in zip(moving, reference, strict=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
    model.eval()
    return TrainStats(n, steps, total / steps if steps else float("nan"), time.perf_counter() - start)


def mixed(model: Recommender, personal: Mapping[str, Tensor], weight: float) -> Recommender:
    """A copy of ``model`` whose parameters in ``personal`` are ``weight · personal + (1 - weight) · model's``."""
    out = copy.deepcopy(model)
    current = out.state_dict()
    blend = {name: weight * p.to(current[name].device) + (1 - weight) * current[name] for name, p in personal.items()}
    out.load_state_dict(blend, strict=False)
    return out


def ditto_select(
    model: Recommender,
    personal: Mapping[str, Tensor] | None,
    split: UserSplit,
    settings: PersonalizeSettings,
    *,
    k: int,
    device: torch.device,
) -> MixResult:
    """The mix of ``model`` (the global one) and the silo's personal parameters it keeps.

    Candidates are β = 0 (``model`` itself) and each β of :data:`MIX_WEIGHTS`; the
    choice is :func:`keep`'s on the silo's validation hits@``k`` at
    ``settings.margin``. Without a personal model yet (no round trained) the copy is
    ``model``'s. ``model`` is not modified.
    """
    base = copy.deepcopy(model).to(device)
    if personal is None:
        base.eval()
        return MixResult(base, 0.0, (float(_val_user_hits(base, split, k, device).sum()),))
    candidates = [mixed(base, personal, weight) for weight in MIX_WEIGHTS]
    hits = [_val_user_hits(m, split, k, device) for m in (base, *candidates)]
    chosen = keep(hits[0], hits[1:], settings.margin)
    kept = base if chosen == 0 else candidates[chosen - 1]
    kept.eval()
    weight = 0.0 if chosen == 0 else MIX_WEIGHTS[chosen - 1]
    return MixResult(kept, weight, tuple(float(h.sum()) for h in hits))


def recent_profile(split: UserSplit, item_rows: NDArray[np.floating], items: int) -> NDArray[np.float64]:
    """Each user's recency profile (U, d): the mean unit-normalised row of its last ``items`` training items.

    "Last" is the order of the user's rows in ``split`` (time order for a split made
    by time, :func:`common.data.split.leave_one_out`); a user with fewer training
    items averages those it has, one without any gets zeros. Rows of norm 0 count as 0.
    """
    if items < 1:
        raise ValueError(f"recent_profile: items must be >= 1, got {items}")
    unit = unit_rows(item_rows)
    order = np.argsort(split.train_user, kind="stable")  # by user, each user's rows in their own order
    users = split.train_user[order]
    ends = np.cumsum(np.bincount(users, minlength=split.num_users))
    from_end = ends[users] - 1 - np.arange(len(users))  # 0 = the user's last training row
    recent = from_end < items
    profile = np.zeros((split.num_users, unit.shape[1]))
    np.add.at(profile, users[recent], unit[split.train_item[order][recent]])
    counts = np.bincount(users[recent], minlength=split.num_users)
    return profile / np.maximum(counts, 1)[:, None]


def shifted(model: Recommender, profile: NDArray[np.float64], weight: float) -> Recommender:
    """A copy of ``model`` whose users' rows are ``p_u + weight · profile[u]``."""
    out = copy.deepcopy(model)
    rows = out.state_dict()[USER_ROWS]
    shift = torch.from_numpy(profile).to(dtype=rows.dtype, device=rows.device)
    out.load_state_dict({USER_ROWS: rows + weight * shift}, strict=False)
    return out


def recency_select(
    model: Recommender,
    split: UserSplit,
    settings: PersonalizeSettings,
    *,
    k: int,
    device: torch.device,
) -> RecencyResult:
    """The recency-shifted copy of ``model`` (MF) a silo keeps, chosen on its validation users.

    Candidates are every (m, β) of :data:`RECENT_ITEMS` × :data:`RECENT_WEIGHTS`: the
    users' rows ``p_u + β · r_u`` with ``r_u`` :func:`recent_profile` of the item rows
    ``model`` scores with (hybrid-mf: ``e_i + W t_i``); the choice is :func:`keep`'s against the global model at
    ``settings.margin``. A split not ordered by time (``split.order == "random"``) has
    no "latest" items: the global model is kept. ``model`` is not modified.
    """
    base = copy.deepcopy(model).to(device)
    base.eval()
    state = base.state_dict()
    if USER_ROWS not in state or ITEM_ROWS not in state:
        raise ValueError(f"personalize.method = recency: {type(model).__name__} has no {USER_ROWS} / {ITEM_ROWS}")
    global_hits = _val_user_hits(base, split, k, device)
    if split.order != "time":
        return RecencyResult(base, 0, 0.0, (float(global_hits.sum()),))
    with torch.no_grad():  # hybrid-mf: the item vectors e_i + W t_i it scores with
        vectors = base.item_vectors() if isinstance(base, HybridMF) else state[ITEM_ROWS]
    item_rows = vectors.detach().cpu().numpy()
    grid = [(m, weight) for m in RECENT_ITEMS for weight in RECENT_WEIGHTS]
    profiles = {m: recent_profile(split, item_rows, m) for m in RECENT_ITEMS}
    hits = [_val_user_hits(shifted(base, profiles[m], weight), split, k, device) for m, weight in grid]
    chosen = keep(global_hits, hits, settings.margin)
    curve = tuple(float(h.sum()) for h in (global_hits, *hits))
    if chosen == 0:
        return RecencyResult(base, 0, 0.0, curve)
    m, weight = grid[chosen - 1]
    kept = shifted(base, profiles[m], weight)
    kept.eval()
    return RecencyResult(kept, m, weight, curve)


@torch.no_grad()
def _val_user_hits(model: Recommender, split: UserSplit, k: int, device: torch.device) -> NDArray[np.float64]:
    """One 0/1 validation hit@k per user with a validation item (the evaluation's sampled protocol)."""
    model.eval()
    users = np.flatnonzero(split.val_item != NO_ITEM)
    items = np.concatenate([split.val_item[users, None], split.val_negatives[users]], axis=1)
    scores = model(torch.from_numpy(users).to(device), torch.from_numpy(items).to(device)).double().cpu().numpy()
    return metrics.hits_at_k(metrics.sampled_rank(scores[:, 0], scores[:, 1:]), k)
