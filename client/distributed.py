"""A silo's round under distributed user-level DP (``privacy.mode = "distributed"``).

The silo is its users' trusted aggregator (DP-FedAvg with per-user deltas,
:mod:`common.privacy.distributed`). Each training message has a phase
(:data:`~common.privacy.distributed.PHASE`):

* ``roster``: reply the public roster N (the number of the silo's users) only;
* ``popularity``: stage Σ over the silo's users of their L2-normalised item vectors
  plus the histogram noise share σ_h/√(S − T) for the secure sum;
* ``train``: refit every user's own rows on their own data (never released), Poisson-sample
  users at q, compute each sampled user's delta of the shared parameters (``train.local-epochs``
  SGD steps of ``privacy.distributed.lr`` on the user's mean loss), clip it to C, sum,
  add the noise share σ·C/√(S − T) and stage the vector for the secure sum. With
  ``privacy.distributed.top-items`` only the rows of the items with the largest released DP
  counts are in a user's delta (:func:`trainable_items`).

The reply carries no arrays: partition id, roster N and :data:`STAGED`. σ, σ_h, q and δ are
computed here from the run config and the server's N_total and S
(:func:`common.privacy.distributed.mechanism`), never taken from the server. Noise and the
users' sample draw from the OS's entropy; only training negatives are seeded. The silo keeps
its own view of each release in its ledger (the server's mechanism, owner ``silo-<k>``) and
its training loss in ``silo-report.jsonl``.
"""

from __future__ import annotations

import json
import math
from logging import INFO
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict
from flwr.supercore import log

from client import secagg, state
from common import records
from common.config import AppConfig
from common.data.split import UserSplit
from common.errors import ConfigError
from common.evaluation import DP_POPULARITY, ranking_sums
from common.models import MF, shared_state
from common.privacy import distributed as dd
from common.privacy import dp_als
from common.privacy.events import silo_owner
from common.secagg import vectors
from common.seeding import numpy_rng
from common.training import interaction_loss, interaction_negatives

if TYPE_CHECKING:
    from client.session import Session

SILO_REPORT = "silo-report.jsonl"
_CHUNK = 65_536  # interactions per autograd pass


def train(session: Session) -> RecordDict:
    """One training message of a silo under distributed DP; see the module docstring."""
    cfg, config, split = session.cfg, session.config, session.data.split
    phase = str(config.get(dd.PHASE, ""))
    if phase not in dd.PHASES:
        raise ConfigError(f"distributed DP: the server sent phase {phase!r}, expected one of {', '.join(dd.PHASES)}")
    reply: dict[str, int | float | list[int] | list[float]] = {
        records.PARTITION_ID: session.partition_id,
        records.NUM_EXAMPLES: split.num_users,
    }
    if phase == "roster":
        return RecordDict({records.METRICS: MetricRecord(reply)})
    mech = _mechanism(session)
    noise = np.random.default_rng()  # OS entropy: the server must not know the noise
    if phase == "popularity":
        vector = dd.user_item_histogram(split.train_user, split.train_item, split.num_items)
        vector = vector + noise.normal(0.0, mech.histogram_share_std, vector.size)
        kind, use = dd.KIND_HISTOGRAM, dd.histogram_use(mech.histogram_noise_multiplier)
    elif cfg.privacy.distributed.algorithm == "als":
        vector, line = als_statistics(session, mech, noise)
        kind, use = dd.KIND_ALS, dd.training_use(mech.noise_multiplier, mech.rate)
        _keep_own(session, line)
    else:
        model = session.model
        assert isinstance(model, MF)
        loss = fit_user_rows(model, split, cfg, session.partition_id, session.server_round)
        state.save_user_params(session.context.state, model)
        sampled = dd.poisson_sample(split.num_users, mech.rate, noise)
        total, clipped = clipped_delta_sum(model, split, cfg, sampled, mech.clip, session.partition_id,
                                           session.server_round, trainable_items(session))  # fmt: skip
        vector = total + noise.normal(0.0, mech.share_std, total.size)
        kind, use = dd.KIND_TRAINING, dd.training_use(mech.noise_multiplier, mech.rate)
        _keep_own(session, {"kind": "training", "loss": loss, "sampled-users": int(sampled.size),
                            "clipped-users": clipped})  # fmt: skip
    secagg.stage_input(session.context, session.server_round, vector)
    _record_own_view(session, mech, kind, use)
    log(INFO, "silo %d staged its %s vector for round %d's secure sum", session.partition_id, phase,
        session.server_round)  # fmt: skip
    return RecordDict({records.METRICS: MetricRecord({**reply, dd.STAGED: 1})})


def _mechanism(session: Session) -> dd.Mechanism:
    population = int(session.config.get(dd.POPULATION, 0))  # type: ignore[arg-type]
    silos = int(session.config.get(dd.SILOS, 0))  # type: ignore[arg-type]
    if population < session.data.split.num_users or silos < 1:
        raise ConfigError(
            f"distributed DP: the server says N_total = {population} users over {silos} silos; this silo alone has "
            f"{session.data.split.num_users}"
        )
    cfg = session.cfg
    return dd.mechanism(cfg.privacy.distributed, cfg.num_server_rounds, population, silos, cfg.privacy.accountant)


def trainable_items(session: Session) -> np.ndarray | None:
    """``top-items``: the mask of the items whose rows train, from the released histogram the server sent.

    The silo computes the set itself (its own ``top-items``, :func:`dd.top_item_mask`). A server
    that sent another histogram can only change which coordinates the users' clipped deltas
    cover, never their bound C or the noise. No histogram released (its secure sum aborted):
    every item trains, as on the server. None when ``top-items`` = 0.
    """
    top = session.cfg.privacy.distributed.top_items
    released = session.config.get(dd.RELEASED_POPULARITY)
    if top == 0 or released is None:
        return None
    num_items = session.data.split.num_items
    if not isinstance(released, list) or len(released) != num_items:
        raise ConfigError(
            f"distributed DP: the server's {dd.RELEASED_POPULARITY} in the train message is not a list of "
            f"{num_items} counts (this silo's catalogue)"
        )
    return dd.top_item_mask(np.asarray(released, dtype=np.float64), top)


# ---------------------------------------------------------------- DP-ALS (algorithm = "als")
def als_user_rows(session: Session) -> None:
    """Every user's exact ALS row against the received item table, into the model and the node state.

    Each row is a function of its user's own training items and the public item table only
    (:func:`common.privacy.dp_als.user_rows`); user biases are 0 under ALS. Never released.
    """
    model, split, dist = session.model, session.data.split, session.cfg.privacy.distributed
    assert isinstance(model, MF)
    q = model.item_embedding.weight.detach().double().numpy()
    rows = dp_als.user_rows(q, split.train_user, split.train_item, split.num_users, dist.als_reg,
                            dist.als_unobserved_weight, dist.als_max_items)  # fmt: skip
    with torch.no_grad():
        model.user_embedding.weight.copy_(torch.from_numpy(rows))
        model.user_bias.weight.zero_()
    state.save_user_params(session.context.state, model)


def als_statistics(session: Session, mech: dd.Mechanism, noise: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The silo's staged DP-ALS vector (its sampled users' bounded statistics + its noise share) and its own line."""
    als_user_rows(session)
    model, split, dist = session.model, session.data.split, session.cfg.privacy.distributed
    assert isinstance(model, MF)
    sampled = dd.poisson_sample(split.num_users, mech.rate, noise)
    rows = model.user_embedding.weight.detach().double().numpy()
    total, mean_norm = dp_als.user_statistics(rows, split.train_user, split.train_item, sampled, split.num_items,
                                            dist.als_max_items, dist.als_row_clip)  # fmt: skip
    vector = total + noise.normal(0.0, mech.share_std, total.size)
    return vector, {"kind": "training-als", "sampled-users": int(sampled.size), "mean-row-norm": mean_norm}


# ---------------------------------------------------------------- the users' own rows
def _weights(split: UserSplit) -> np.ndarray:
    """1 / n_u for each training interaction: every user's loss is the mean over their own interactions."""
    counts = np.bincount(split.train_user, minlength=split.num_users)
    return 1.0 / counts[split.train_user]


def fit_user_rows(model: MF, split: UserSplit, cfg: AppConfig, partition_id: int, server_round: int) -> float:
    """``user-steps`` full-batch Adam steps on the user tables only (L2: ``user-l2``); the last step's mean loss.

    The loss is Σ_u (mean loss of u's interactions), negatives keyed per interaction, so each
    user's rows move on that user's data alone (Adam is element-wise): they are the user's
    own, never released, and a sampled user's delta depends on no other user's data.
    """
    dist, settings = cfg.privacy.distributed, cfg.train
    if dist.user_steps == 0 or split.num_train == 0:
        return math.nan
    rng = numpy_rng(cfg.seed, "distributed-negatives", partition_id, server_round)
    items = np.concatenate(
        [split.train_item[:, None], interaction_negatives(int(rng.integers(2**63)), split.train_user,
                                                          split.train_item, settings.num_negatives, split.num_items)],
        axis=1,
    )  # fmt: skip
    users_t, items_t = torch.from_numpy(split.train_user), torch.from_numpy(items)
    weights = torch.from_numpy(_weights(split)).float()
    tables = [model.user_embedding.weight, model.user_bias.weight]
    opt = torch.optim.Adam(tables, lr=dist.user_lr)
    item_emb, item_bias = model.item_embedding.weight.detach(), model.item_bias.weight.detach()
    gb = model.global_bias.value.detach()
    last = math.nan
    for _ in range(dist.user_steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for lo in range(0, split.num_train, _CHUNK):
            u, it, w = users_t[lo : lo + _CHUNK], items_t[lo : lo + _CHUNK], weights[lo : lo + _CHUNK]
            p, bu = model.user_embedding(u), model.user_bias(u)
            logits = torch.einsum("bd,btd->bt", p, item_emb[it]) + bu + item_bias[it].squeeze(-1) + gb
            per = interaction_loss(logits, settings.loss) + dist.user_l2 * p.pow(2).sum(-1)
            loss = (per * w).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            total += float(loss.detach())
        opt.step()
        last = total / split.num_users
    return last


# ---------------------------------------------------------------- the sampled users' deltas
def clipped_delta_sum(
    model: MF, split: UserSplit, cfg: AppConfig, sampled: np.ndarray, clip: float, partition_id: int, server_round: int,
    trainable: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Σ over ``sampled`` users of their deltas of the shared parameters, each clipped to L2 ≤ C.

    A user's delta is the change of ``train.local-epochs`` full-batch SGD steps of
    ``privacy.distributed.lr`` on the user's mean loss (their interactions, keyed negatives),
    starting from the shared model and the user's own rows, of their own copy of the shared
    rows they read (item embeddings and biases of their positives and negatives, the global
    bias). Vectorised: one copy per (user, item) pair, so no user's steps see another's data.
    Returned flat in :func:`common.secagg.vectors.flatten` order of the shared state, with the
    number of users whose delta was clipped. ``trainable`` (``top-items``): the item rows of
    other items are dropped from each user's delta before it is clipped. ``frozen-dims`` K: the
    first K columns of the item embeddings keep their values in the local steps and are 0 in
    every delta, so C bounds the learned columns alone.
    """
    shared = {k: v.numpy() for k, v in shared_state(model).items()}
    num_items, dim = split.num_items, model.item_embedding.weight.shape[1]
    lr, settings = cfg.privacy.distributed.lr, cfg.train
    frozen = cfg.privacy.distributed.freeze_biases  # item biases stay at the DP-popularity anchor, b at its start
    fixed_dims = cfg.privacy.distributed.frozen_dims  # the item table's first K columns: its public start
    sum_emb = torch.zeros(num_items, dim, dtype=torch.float64)
    sum_bias = torch.zeros(num_items, dtype=torch.float64)
    sum_global = 0.0
    clipped = 0
    mask = np.isin(split.train_user, sampled)
    users, pos = split.train_user[mask], split.train_item[mask]
    if users.size:
        rng = numpy_rng(cfg.seed, "distributed-negatives", partition_id, server_round)
        negatives = interaction_negatives(int(rng.integers(2**63)), users, pos, settings.num_negatives, num_items)
        items = np.concatenate([pos[:, None], negatives], axis=1)
        weights = torch.from_numpy(_weights(split)[mask]).float()
        users_t = torch.from_numpy(users)
        pair = torch.from_numpy(users[:, None] * num_items + items)
        uniq, inverse = torch.unique(pair.reshape(-1), return_inverse=True)
        inverse = inverse.reshape(pair.shape)
        pair_user, pair_item = uniq // num_items, uniq % num_items
        emb0 = model.item_embedding.weight.detach()[pair_item].clone()
        bias0 = model.item_bias.weight.detach()[pair_item].squeeze(-1).clone()
        glob0 = model.global_bias.value.detach().expand(split.num_users).clone()
        emb, bias, glob = emb0.clone().requires_grad_(), bias0.clone().requires_grad_(), glob0.clone().requires_grad_()
        p = model.user_embedding.weight.detach().clone().requires_grad_()
        bu = model.user_bias.weight.detach().clone().requires_grad_()
        for _ in range(settings.local_epochs):
            pu = p[users_t]
            logits = torch.einsum("bd,btd->bt", pu, emb[inverse]) + bu[users_t] + bias[inverse] + glob[users_t, None]
            per = interaction_loss(logits, settings.loss) + settings.l2 * emb[inverse].pow(2).sum((-1, -2))
            grads = torch.autograd.grad((per * weights).sum(), [emb, bias, glob, p, bu])
            with torch.no_grad():
                for param, grad in zip((emb, bias, glob, p, bu), grads, strict=True):
                    if param is emb and fixed_dims:
                        grad[:, :fixed_dims] = 0.0
                    if not (frozen and (param is bias or param is glob)):
                        param -= lr * grad
        pair_emb = (emb.detach() - emb0).double()
        pair_bias = (bias.detach() - bias0).double()
        if trainable is not None:
            keep = torch.from_numpy(trainable)[pair_item]
            pair_emb = pair_emb * keep[:, None]
            pair_bias = pair_bias * keep
        user_glob = (glob.detach() - glob0).double()
        n_users = split.num_users
        touched = torch.zeros(n_users, dtype=torch.bool)
        touched[users_t] = True
        user_glob = torch.where(touched, user_glob, torch.zeros_like(user_glob))
        sq = torch.zeros(n_users, dtype=torch.float64).index_add_(
            0, pair_user, pair_emb.pow(2).sum(-1) + pair_bias.pow(2)
        ) + user_glob.pow(2)
        norm = sq.sqrt()
        scale = torch.where(norm > clip, clip / norm.clamp_min(1e-300), torch.ones_like(norm))
        clipped = int((norm[torch.from_numpy(sampled)] > clip).sum()) if sampled.size else 0
        sum_emb.index_add_(0, pair_item, scale[pair_user, None] * pair_emb)
        sum_bias.index_add_(0, pair_item, scale[pair_user] * pair_bias)
        sum_global = float((scale * user_glob).sum())
    out = {
        "item_embedding.weight": sum_emb.numpy(),
        "item_bias.weight": sum_bias.numpy()[:, None],
        "global_bias.value": np.array([sum_global]),
    }
    if set(out) != set(shared) or any(out[k].shape != shared[k].shape for k in out):
        raise ConfigError(f"distributed DP: the shared state {sorted(shared)} is not biased MF's")
    return vectors.flatten(out), clipped


# ---------------------------------------------------------------- evaluation beside the model
def popularity_sums(session: Session) -> dict[str, float]:
    """Sums (``dp-popularity-{val,test}-hits@K``, ``-ndcg@K``) of ranking by the released DP histogram.

    The histogram came with the evaluate message (public since its release: post-processing);
    the silo ranks the same candidates as the model's, so the sums sit beside the model's in its
    withheld evaluation. Empty when the run released no histogram.
    """
    from client.silo import eval_protocol

    released = session.config.get(dd.RELEASED_POPULARITY)
    split = session.data.split
    if not isinstance(released, list):
        return {}
    if len(released) != split.num_items:
        raise ConfigError(
            f"distributed DP: the server's {dd.RELEASED_POPULARITY} has {len(released)} items, this silo has "
            f"{split.num_items}"
        )
    histogram = np.asarray(released, dtype=np.float64)
    return ranking_sums(histogram, split, eval_protocol(session.cfg), DP_POPULARITY)


# ---------------------------------------------------------------- what stays in the silo
def _keep_own(session: Session, line: dict[str, object]) -> None:
    full = {"round": session.server_round, **line}
    log(INFO, "silo %d keeps: %s", session.partition_id, full)
    if session.store is not None:
        with (session.store.path / SILO_REPORT).open("a") as f:
            f.write(json.dumps(full, sort_keys=True) + "\n")


def _record_own_view(session: Session, mech: dd.Mechanism, kind: str, use: dd.MechanismUse) -> None:
    """The silo's ledger line: the release the server's accountant makes for this use, as the silo sees it.

    The silo cannot see whether the secure sum succeeded, so its view counts every use it
    staged (never fewer than the server's).
    """
    from client import privacy
    from common.privacy.ledger import releases

    node_state, pid = session.context.state, session.partition_id
    chain = privacy.load_ledger(node_state, pid)
    acc = dd.union_accountant(mech, silo_owner(pid), session.cfg.privacy.accountant)
    for rel in releases(chain):
        if rel.use is not None:
            acc.record(rel.server_round, rel.use)
    released = dd.training_released(session.cfg.privacy.distributed)
    chain.append_release(dd.record_release(acc, session.server_round, kind, use, mech, released))
    privacy.save_ledger(node_state, chain)
    if session.store is not None:
        session.store.save_state(node_state)
