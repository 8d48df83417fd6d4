"""Bounded influence of one silo on the shared model: weight caps, norm bounds, robust aggregation.

A round's valid training replies become :class:`Candidate` updates Δ_i = w_i − w of
the shared model. Each candidate's FedAvg weight is capped at the silo's registered
weight (:mod:`server.registry`), each update's L2 norm is bounded (clipped or
rejected above ``strategy.norm-bound``, by default 3 × the round's median norm),
the survivors are aggregated (FedAvg or a robust aggregator of
:mod:`server.aggregators`), and the aggregate is checked before it may replace the
model. Every step leaves its trace in the silo's :class:`~common.rundir.SiloRoundStats`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from numpy.typing import NDArray

from common import records
from common.config import StrategySettings
from common.privacy.clipping import clip_update, l2_norm
from common.round_record import SiloRoundStats
from server import aggregators

Update = dict[str, NDArray[np.float64]]


@dataclass(slots=True)
class Candidate:
    """One valid training reply of a round, as the defences see it."""

    msg: Message
    node: int
    partition_id: int | None
    weight_claimed: float
    weight_used: float
    update: Update
    norm: float
    clipped: bool = False
    rejected: str | None = None
    cosine: float | None = None

    def stats(self, bound: float | None) -> SiloRoundStats:
        """Its line of the anomaly report."""
        against = self.cosine is not None and self.cosine < 0
        above = bound is not None and self.norm > bound
        return SiloRoundStats(
            node=self.node,
            partition_id=self.partition_id,
            weight_claimed=self.weight_claimed,
            weight_used=self.weight_used,
            norm=self.norm,
            cosine=self.cosine,
            clipped=self.clipped,
            outlier=bool(above or against),
            rejected=self.rejected,
        )


def metrics_problem(metrics: MetricRecord | None) -> str | None:
    """Why a training reply's metrics are unusable (missing, wrong type, out of range)."""
    if metrics is None:
        return f"reply has no '{records.METRICS}' record"
    for key, lo in ((records.NUM_EXAMPLES, 0.0), (records.TRAIN_SECONDS, 0.0), (records.TRAIN_CPU_SECONDS, 0.0)):
        if key != records.NUM_EXAMPLES and key not in metrics:
            continue  # under DP a silo keeps its training time (common.privacy.release)
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"'{key}' must be a finite number, got {value!r}"
        if value < lo or (key == records.NUM_EXAMPLES and value == 0):
            return f"'{key}' must be {'positive' if key == records.NUM_EXAMPLES else '>= 0'}, got {value!r}"
    loss = metrics.get(records.TRAIN_LOSS, 0.0)  # absent under DP: the silo keeps it
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):  # NaN: an empty round
        return f"'{records.TRAIN_LOSS}' must be a number, got {loss!r}"
    pid = metrics.get(records.PARTITION_ID)
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 0):
        return f"'{records.PARTITION_ID}' must be a non-negative integer, got {pid!r}"
    return None


def capped_weight(
    claimed: float, partition_id: int | None, registered: Mapping[int, int], settings: StrategySettings
) -> float:
    """``claimed`` capped at the silo's registered weight (or the largest one, or ``max-weight``)."""
    if not settings.cap_weights:
        return claimed
    max_weight = settings.max_weight
    caps = []
    if max_weight > 0:
        caps.append(float(max_weight))
    if registered:
        if partition_id is not None and partition_id in registered:
            caps.append(float(registered[partition_id]))
        else:  # unknown partition: no more than the largest registered silo
            caps.append(float(max(registered.values())))
    return min([claimed, *caps])


def norm_bound(norms: list[float], settings: StrategySettings) -> float | None:
    """The round's bound on update norms (None when bounding is off or nothing to bound)."""
    if settings.norm_action == "none" or not norms:
        return None
    if settings.norm_bound > 0:
        return settings.norm_bound
    return settings.norm_bound_factor * float(np.median(norms))


def bound_norms(candidates: list[Candidate], bound: float | None, action: str) -> None:
    """Clip or reject the candidates whose update norm exceeds ``bound``."""
    if bound is None:
        return
    for c in candidates:
        if c.rejected is None and c.norm > bound:
            if action == "reject":
                c.rejected = f"update norm {c.norm:.4g} exceeds the bound {bound:.4g}"
            else:
                c.update, _ = clip_update(c.update, bound)
                c.clipped = True


def reject_opposed(candidates: list[Candidate], min_cosine: float) -> None:
    """Reject updates pointing against the others: cosine with the mean of the rest below ``min_cosine``.

    Each candidate is compared with the plain mean of the *other* candidates' (bounded)
    updates, so an attacker cannot drag the reference it is judged by. At most
    ⌊(n − 1) / 2⌋ updates are rejected, the most opposed first: the honest majority
    the aggregate relies on is never voted out. Needs at least 3 candidates.
    """
    kept = [c for c in candidates if c.rejected is None]
    n = len(kept)
    if n < 3:
        return
    total = {k: np.sum([c.update[k] for c in kept], axis=0) for k in kept[0].update}
    scores = []
    for c in kept:
        rest = {k: (total[k] - c.update[k]) / (n - 1) for k in total}
        norm, rest_norm = l2_norm(c.update), l2_norm(rest)
        if norm == 0 or rest_norm == 0:
            continue
        cosine = sum(float((c.update[k] * rest[k]).sum()) for k in rest) / (norm * rest_norm)
        if cosine < min_cosine:
            scores.append((cosine, c))
    for cosine, c in sorted(scores, key=lambda x: x[0])[: (n - 1) // 2]:
        c.rejected = f"update points against the other silos' (cosine {cosine:.3f} < {min_cosine:g})"


def aggregate(updates: list[Update], weights: list[float], settings: StrategySettings) -> Update | None:
    """The aggregate of the accepted updates (None when there are none)."""
    if not updates:
        return None
    if settings.aggregator == "fedavg":
        return aggregators.weighted_mean(updates, weights)
    if settings.aggregator == "median":
        return aggregators.coordinate_median(updates)
    if settings.aggregator == "trimmed-mean":
        return aggregators.trimmed_mean(updates, settings.trim_fraction)
    f = settings.krum_malicious
    if len(updates) < 2 * f + 3:  # too few updates for Krum's guarantee: the median tolerates f < n / 2
        return aggregators.coordinate_median(updates)
    selected = min(settings.krum_selected or len(updates) - f, len(updates))
    result, _ = aggregators.multi_krum(updates, f, selected)
    return result


def aggregate_problem(total: Update, updates: list[Update]) -> str | None:
    """Why the aggregate may not replace the model: non-finite, or outside the inputs' envelope.

    Every aggregator here (a convex combination, or a coordinate-wise median, trimmed
    mean or Krum selection of the inputs) keeps each coordinate within the largest
    absolute value the inputs have there; an aggregate beyond that envelope means
    overflow or a bug, and the model is kept.
    """
    for name, value in total.items():
        if not np.isfinite(value).all():
            return f"the aggregate of {name} is not finite"
    for name, value in total.items():
        envelope = np.zeros_like(value)
        for u in updates:
            np.maximum(envelope, np.abs(u[name]), out=envelope)
        excess = np.abs(value) - envelope
        if (excess > 1e-6 * (envelope + 1.0)).any():
            return (
                f"the aggregate of {name} leaves the envelope of the accepted updates (max excess {excess.max():.4g})"
            )
    return None


def set_cosines(candidates: list[Candidate], total: Update | None) -> None:
    """Each candidate's cosine with the aggregate update (as received, before clipping)."""
    if total is None:
        return
    total_norm = l2_norm(total)
    for c in candidates:
        norm = l2_norm(c.update)
        if norm > 0 and total_norm > 0:
            c.cosine = sum(float((c.update[k] * total[k]).sum()) for k in total) / (norm * total_norm)


def new_arrays(current: ArrayRecord, total: Update) -> ArrayRecord:
    """The current model plus the aggregate update, in the current model's dtypes."""
    return ArrayRecord(
        {k: Array((ref.numpy().astype(np.float64) + total[k]).astype(ref.numpy().dtype)) for k, ref in current.items()}
    )


def weighted_content(current: ArrayRecord, c: Candidate) -> RecordDict:
    """The candidate as reply content after the defences (bounded update, capped weight)."""
    metrics = dict(c.msg.content.metric_records[records.METRICS])
    metrics[records.NUM_EXAMPLES] = c.weight_used
    return RecordDict({records.ARRAYS: new_arrays(current, c.update), records.METRICS: MetricRecord(metrics)})
