"""Evaluate a recommender on a set of users, as sums that silos can add up.

Federated evaluation cannot pool users, so each silo returns *sums* (hits, DCG,
user counts, exposure and activity histograms) and the server divides the pooled
sums. :func:`summarize` turns pooled sums into the reported metrics; the
centralized baseline uses the same two functions on one "silo" holding everyone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from common import metrics
from common.data.split import NO_ITEM, UserSplit
from common.models import NeuMF, Recommender

MAX_ACTIVITY = 1000  # activity histogram: train counts clipped to this value
MIB = 2**20
#: Bytes per (user, item) pair of full ranking's (users × items) arrays: the model's
#: float32 scores, their float64 copy, the exclusion mask, and ``top_k_items``'
#: lexsort (negated scores, int64 order, sort buffers). Measured ≈ 45; 64 leaves slack.
RANKING_PAIR_BYTES = 64
SumValue = float | list[float]
#: Prefix of the sums (and metrics) of each silo's personalized model (personalize.enabled).
PERSONALIZED = "personalized-"
#: Prefix of the popularity ranking's sums (and metrics) on the same candidates.
POPULARITY = "popularity-"
#: Prefix of the sums of the ranking by a released DP popularity histogram (distributed DP).
DP_POPULARITY = "dp-popularity-"


@dataclass(frozen=True, slots=True)
class EvalProtocol:
    """Cutoffs and options of the evaluation protocol.

    ``personalized``: every reply also carries the same sums of the silo's
    personalized model, each key prefixed with :data:`PERSONALIZED`.
    ``memory_mb``: working-memory budget of scoring. Full ranking scores blocks of
    users sized so that the block's (users × items) arrays take half of it, and a
    model whose forward pass holds per-pair activations (NeuMF) is run on
    (users × items) chunks whose activations take the other half; the metrics do
    not depend on the block sizes. ``val_users``: the validation phase evaluates a
    fixed random subset of at most this many users (0 = all; drawn from
    ``val_seed``, the same subset every round); the test phase always evaluates
    every user.
    """

    k: int = 10
    full_ranking: bool = True
    full_ranking_k: int = 20
    batch_users: int = 1024
    personalized: bool = False
    memory_mb: float = 512.0
    val_users: int = 0
    val_seed: int = 0

    def __post_init__(self) -> None:
        if not self.memory_mb > 0:
            raise ValueError(f"eval.memory-mb must be > 0, got {self.memory_mb}")
        if self.val_users < 0:
            raise ValueError(f"eval.val-users must be >= 0 (0 = all), got {self.val_users}")

    @property
    def budget_bytes(self) -> float:
        """The working-memory budget in bytes."""
        return self.memory_mb * MIB


@torch.no_grad()
def evaluation_sums(
    model: Recommender,
    split: UserSplit,
    protocol: EvalProtocol,
    item_popularity: NDArray[np.float64],
    device: torch.device,
) -> dict[str, SumValue]:
    """Score the validation and test items of every user of ``split``; return sums.

    Sampled protocol: the held-out item is ranked among its fixed sampled negatives
    (ties count against it). Full ranking (test only): the held-out item is ranked
    among all items the user has not trained on.

    Returns
    -------
    dict
        ``{phase}-users``, ``{phase}-hits@K``, ``{phase}-ndcg@K`` for phase in
        (val, test); with full ranking also ``test-full-recall@K``,
        ``test-full-ndcg@K`` for K in (k, full_ranking_k), ``exposure`` (I,),
        ``arp`` (sum of per-user ARP), ``activity-users`` and ``activity-hits``
        histograms (index = train count, clipped to ``MAX_ACTIVITY``).
    """
    model.eval()
    k = protocol.k
    sums: dict[str, SumValue] = {}
    for phase, users, items in _candidates(split, protocol):
        batch = max(1, int(protocol.budget_bytes // (items.shape[1] * (activation_bytes(model) + 16))))
        scores = _score(model, users, items, device, batch)
        ranks = metrics.sampled_rank(scores[:, 0], scores[:, 1:])
        hits = metrics.hits_at_k(ranks, k)
        sums[f"{phase}-users"] = float(len(users))
        sums[f"{phase}-hits@{k}"] = float(hits.sum())
        sums[f"{phase}-ndcg@{k}"] = float(metrics.dcg_at_k(ranks, k).sum())
        # The popularity ranking on the same candidates: the floor beside the model.
        popular = item_popularity[items]
        pop_ranks = metrics.sampled_rank(popular[:, 0], popular[:, 1:])
        sums[f"{POPULARITY}{phase}-hits@{k}"] = float(metrics.hits_at_k(pop_ranks, k).sum())
        sums[f"{POPULARITY}{phase}-ndcg@{k}"] = float(metrics.dcg_at_k(pop_ranks, k).sum())
        if phase == "test":
            activity = np.minimum(split.train_counts()[users], MAX_ACTIVITY)
            counts, hit_sums = metrics.activity_histogram_sums(hits, activity, MAX_ACTIVITY)
            sums["activity-users"] = counts.astype(float).tolist()
            sums["activity-hits"] = hit_sums.astype(float).tolist()
    if protocol.full_ranking:
        sums.update(_full_ranking_sums(model, split, protocol, item_popularity, device))
    return sums


def _candidates(split: UserSplit, protocol: EvalProtocol) -> list[tuple[str, NDArray[np.int64], NDArray[np.int64]]]:
    """(phase, users, candidate items (U, 1 + negatives): the held-out item first) for val and test."""
    out = []
    for phase, target, negatives in (
        ("val", split.val_item, split.val_negatives),
        ("test", split.test_item, split.test_negatives),
    ):
        users = np.flatnonzero(target != NO_ITEM)
        if phase == "val" and 0 < protocol.val_users < len(users):
            chosen = np.random.default_rng(protocol.val_seed).choice(len(users), protocol.val_users, replace=False)
            users = users[np.sort(chosen)]
        out.append((phase, users, np.concatenate([target[users, None], negatives[users]], axis=1)))
    return out


def ranking_sums(
    item_scores: NDArray[np.float64], split: UserSplit, protocol: EvalProtocol, prefix: str
) -> dict[str, float]:
    """``{prefix}{val,test}-hits@K`` and ``-ndcg@K`` of ranking every user's candidates by one score per item.

    The same users and candidates as :func:`evaluation_sums` (ties count against the held-out
    item), so the sums sit beside the model's; e.g. a released DP popularity histogram.
    """
    scores = np.asarray(item_scores, dtype=np.float64).ravel()
    if scores.size != split.num_items:
        raise ValueError(f"ranking_sums: {scores.size} item scores for {split.num_items} items")
    sums: dict[str, float] = {}
    for phase, _, items in _candidates(split, protocol):
        ranked = scores[items]
        ranks = metrics.sampled_rank(ranked[:, 0], ranked[:, 1:])
        sums[f"{prefix}{phase}-hits@{protocol.k}"] = float(metrics.hits_at_k(ranks, protocol.k).sum())
        sums[f"{prefix}{phase}-ndcg@{protocol.k}"] = float(metrics.dcg_at_k(ranks, protocol.k).sum())
    return sums


def _score(
    model: Recommender,
    users: NDArray[np.int64],
    items: NDArray[np.int64],
    device: torch.device,
    batch: int = 4096,
) -> NDArray[np.float64]:
    """Logits of ``items`` (U, T) for local ``users`` (U,)."""
    out = [
        model(
            torch.from_numpy(users[lo : lo + batch]).to(device),
            torch.from_numpy(items[lo : lo + batch]).to(device),
        )
        .double()
        .cpu()
        .numpy()
        for lo in range(0, len(users), batch)
    ]
    return np.concatenate(out) if out else np.empty((0, items.shape[1]))


def activation_bytes(model: Recommender) -> int:
    """Upper estimate of the bytes a forward pass holds per scored (user, item) pair.

    MF (and models scoring by one matmul) hold the float32 logit; NeuMF holds each
    pair's gathered rows, their concatenations and every layer's output (float32),
    counted twice for the temporaries in between.
    """
    if not isinstance(model, NeuMF):
        return 3 * 4
    widths = sum(2 * table.embedding_dim for table in (model.item_gmf, model.item_mlp, model.user_gmf, model.user_mlp))
    widths += sum(layer.out_features for layer in model.mlp if isinstance(layer, nn.Linear))
    widths += model.output.in_features + 1
    return 2 * 4 * widths


def score_users(model: Recommender, users: torch.Tensor, budget_bytes: float) -> torch.Tensor:
    """Scores (U, I) of every catalogue item for ``users``, the forward pass within ``budget_bytes``.

    NeuMF scores (users × items) chunks of at most ``budget_bytes / activation_bytes``
    pairs (at least one item per chunk); other models use ``score_all``.
    """
    if not isinstance(model, NeuMF):
        return model.score_all(users)
    num_items = model.item_gmf.num_embeddings
    chunk = max(1, int(budget_bytes // (activation_bytes(model) * max(1, len(users)))))
    if chunk >= num_items:
        return model.score_all(users)
    out = torch.empty((len(users), num_items), device=users.device)
    for lo in range(0, num_items, chunk):
        items = torch.arange(lo, min(lo + chunk, num_items), device=users.device)
        out[:, lo : lo + len(items)] = model(users, items.expand(len(users), -1))
    return out


def _full_ranking_sums(
    model: Recommender,
    split: UserSplit,
    protocol: EvalProtocol,
    item_popularity: NDArray[np.float64],
    device: torch.device,
) -> dict[str, SumValue]:
    users = np.flatnonzero(split.test_item != NO_ITEM)
    cutoffs = sorted({protocol.k, protocol.full_ranking_k})
    # Per-user ranks and ARPs are kept (U numbers) and summed once at the end, so
    # the sums do not depend on the block sizes (float addition is not associative).
    all_ranks: list[NDArray[np.int64]] = []
    all_arp: list[NDArray[np.float64]] = []
    exposure = np.zeros(split.num_items, dtype=np.int64)
    # Train items of each user, as a CSR-like index for building exclusion masks.
    order = np.argsort(split.train_user, kind="stable")
    starts = np.searchsorted(split.train_user[order], np.arange(split.num_users + 1))
    train_items = split.train_item[order]
    half = protocol.budget_bytes / 2
    block = max(1, min(protocol.batch_users, int(half // (split.num_items * RANKING_PAIR_BYTES))))
    for lo in range(0, len(users), block):
        chunk = users[lo : lo + block]
        scores = score_users(model, torch.from_numpy(chunk).to(device), half).double().cpu().numpy()  # (B, I)
        exclude = np.zeros(scores.shape, dtype=bool)
        lengths = starts[chunk + 1] - starts[chunk]
        rows = np.repeat(np.arange(len(chunk)), lengths)
        cols = np.concatenate([train_items[starts[u] : starts[u + 1]] for u in chunk])
        exclude[rows, cols] = True
        val = split.val_item[chunk]  # known to the silo like the train items: not a candidate for test
        has_val = val != NO_ITEM
        exclude[np.flatnonzero(has_val), val[has_val]] = True
        exclude[np.arange(len(chunk)), split.test_item[chunk]] = False
        ranks = metrics.full_ranking_ranks(scores, split.test_item[chunk], exclude)
        all_ranks.append(ranks)
        top = metrics.top_k_items(scores, exclude, protocol.k)
        exposure += metrics.item_exposure_counts(top, split.num_items)
        all_arp.append(metrics.arp_per_user(top, item_popularity))
    ranks = np.concatenate(all_ranks) if all_ranks else np.zeros(0, dtype=np.int64)
    sums: dict[str, SumValue] = {}
    for c in cutoffs:
        sums[f"test-full-recall@{c}"] = float(metrics.hits_at_k(ranks, c).sum())
        sums[f"test-full-ndcg@{c}"] = float(metrics.dcg_at_k(ranks, c).sum())
    sums["exposure"] = exposure.astype(float).tolist()
    sums["arp"] = float(np.concatenate(all_arp).sum()) if all_arp else 0.0
    return sums


def sum_shapes(protocol: EvalProtocol, num_items: int) -> dict[str, int | None]:
    """Every key :func:`evaluation_sums` returns, with its list length (None: a number)."""
    k = protocol.k
    shapes: dict[str, int | None] = {}
    for phase in ("val", "test"):
        shapes.update({f"{phase}-users": None, f"{phase}-hits@{k}": None, f"{phase}-ndcg@{k}": None})
        shapes.update({f"{POPULARITY}{phase}-hits@{k}": None, f"{POPULARITY}{phase}-ndcg@{k}": None})
    shapes["activity-users"] = MAX_ACTIVITY + 1
    shapes["activity-hits"] = MAX_ACTIVITY + 1
    if protocol.full_ranking:
        for c in sorted({k, protocol.full_ranking_k}):
            shapes[f"test-full-recall@{c}"] = None
            shapes[f"test-full-ndcg@{c}"] = None
        shapes["exposure"] = num_items
        shapes["arp"] = None
    if protocol.personalized:
        shapes.update({PERSONALIZED + key: length for key, length in list(shapes.items())})
    return shapes


def sums_problem(sums: Mapping[str, object], protocol: EvalProtocol, num_items: int) -> str | None:
    """Why one silo's evaluation sums cannot be added to the others' (None when they can).

    Every key of :func:`sum_shapes` must be there and nothing else; every value a
    finite, non-negative number (lists of the right length); hits and DCG sums at most
    the phase's user count.
    """
    shapes = sum_shapes(protocol, num_items)
    if set(sums) != set(shapes):
        extra, missing = sorted(set(sums) - set(shapes)), sorted(set(shapes) - set(sums))
        return f"evaluation sums have unexpected keys {extra} and lack {missing}"
    for key, length in shapes.items():
        value = sums[key]
        values = value if isinstance(value, list) else [value]
        if (length is None) == isinstance(value, list) or (length is not None and len(values) != length):
            return (
                f"evaluation sum {key!r} has the wrong form ({type(value).__name__}, expected {length or 'a number'})"
            )
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                return f"evaluation sum {key!r} holds {v!r}: sums are finite and >= 0"
    for prefix in ("", PERSONALIZED) if protocol.personalized else ("",):
        for phase in ("val", "test"):
            users = float(sums[f"{prefix}{phase}-users"])  # type: ignore[arg-type]
            names = [f"{prefix}{pop}{phase}-{m}@{protocol.k}" for pop in ("", POPULARITY) for m in ("hits", "ndcg")]
            for name in names:
                if float(sums[name]) > users + 1e-6:  # type: ignore[arg-type]
                    return f"evaluation sum {name!r} ({sums[name]}) exceeds the {users:g} users evaluated"
    return None


def add_sums(parts: Sequence[Mapping[str, SumValue]]) -> dict[str, SumValue]:
    """Element-wise sum of several silos' sums (same keys required)."""
    keys = set(parts[0])
    for part in parts[1:]:
        if set(part) != keys:
            raise ValueError(f"evaluation sums disagree on keys: {sorted(keys ^ set(part))}")
    total: dict[str, SumValue] = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        if isinstance(values[0], list):
            total[key] = np.sum(np.asarray(values, dtype=float), axis=0).tolist()
        else:
            total[key] = float(sum(values))  # type: ignore[arg-type]
    return total


def summarize(sums: Mapping[str, SumValue], k: int) -> dict[str, float]:
    """Turn pooled sums into metrics: means over users, coverage, ARP, quintile gap.

    Sums keyed ``personalized-…`` (silos' personalized models) give the same metrics
    under the same prefix.
    """
    personal = {key[len(PERSONALIZED) :]: v for key, v in sums.items() if key.startswith(PERSONALIZED)}
    out: dict[str, float] = {}
    if personal:
        out.update({PERSONALIZED + key: v for key, v in summarize(personal, k).items()})
        sums = {key: v for key, v in sums.items() if not key.startswith(PERSONALIZED)}
    for phase in ("val", "test"):
        n = float(sums[f"{phase}-users"])  # type: ignore[arg-type]
        for name in (f"hits@{k}", f"ndcg@{k}"):
            label = name.replace("hits", "hr")
            out[f"{phase}-{label}"] = float(sums[f"{phase}-{name}"]) / n if n else float("nan")  # type: ignore[arg-type]
            popular = sums.get(f"{POPULARITY}{phase}-{name}")
            if popular is not None:
                out[f"{POPULARITY}{phase}-{label}"] = float(popular) / n if n else float("nan")  # type: ignore[arg-type]
    counts = np.rint(np.asarray(sums["activity-users"], dtype=float)).astype(np.int64)
    hit_sums = np.asarray(sums["activity-hits"], dtype=float)
    out[f"test-hr@{k}-gap-least-most-active"] = metrics.quintile_gap_from_histogram(counts, hit_sums)
    if "exposure" in sums:
        n = float(sums["test-users"])  # type: ignore[arg-type]
        for key, value in sums.items():
            if key.startswith("test-full-"):
                out[key] = float(value) / n if n else float("nan")  # type: ignore[arg-type]
        out[f"coverage@{k}"] = metrics.coverage_from_counts(
            np.rint(np.asarray(sums["exposure"], dtype=float)).astype(np.int64)
        )
        out[f"arp@{k}"] = float(sums["arp"]) / n if n else float("nan")  # type: ignore[arg-type]
    return out
