"""The release policy: what leaves a silo, and what the run directory keeps, per privacy mode.

Under any DP mode (``local``, ``central``, ``local+central``) a silo's training reply
holds only the DP mechanism's output (the shared arrays), its privacy release and
ledger lines (functions of public settings and of DP outputs), its public roster
size ``num-examples`` (N: public under the zero-out relation) and its
``partition-id``. Its training loss and seconds are computed from the Poisson
batches and stay in the silo (its log and ``silo-report.jsonl`` in its state
directory). Evaluation sums are computed from held-out interactions: under
``privacy.release.evaluation = "withheld"`` (the default) they stay in the silo and
the reply only says so; ``"noisy"`` (local DP only) releases them through an
accounted Gaussian mechanism (:func:`noisy_evaluation`).

Under central DP the server sees exact updates (it is trusted with them), so what
it writes to the run directory is what is released: no per-silo anomaly statistics,
no sampled/clipped/aggregated counts, no training metrics, and rejections without
their data-derived reasons (:func:`redact_round`); its ε is in its ledger.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from common.round_record import RoundRecord

EVALUATION_POLICIES: Final = ("withheld", "noisy")
WITHHELD_REASON: Final = "rejected (reason withheld under central DP: it may depend on the silo's data)"
# The evaluation sums a noisy release carries: each user adds at most 1 to each.
NOISY_KEYS: Final = ("val-users", "val-hits@{k}", "val-ndcg@{k}", "test-users", "test-hits@{k}", "test-ndcg@{k}")
NOISY_RELEASED: Final = "noisy evaluation sums (validation and test users, hits@K, DCG@K)"


def is_private(mode: str) -> bool:
    """Whether ``privacy.mode`` is a DP mode (the release policy applies)."""
    return mode != "none"


def redact_round(record: RoundRecord, mode: str) -> RoundRecord:
    """The round as the run directory may keep it under ``privacy.mode`` ``mode``.

    Under central DP (``central``, ``local+central``) drops what the trusted server
    computed from silos' exact updates or replies: training metrics, per-silo anomaly
    statistics, central counts, and rejection reasons (the nodes stay). Other modes:
    unchanged (under local DP every reply is already a DP output).
    """
    if mode not in ("central", "local+central"):
        return record
    return dataclasses.replace(
        record,
        train={},
        central_counts=None,
        silos=(),
        rejected=tuple((node, WITHHELD_REASON) for node, _ in record.rejected),
    )


def noisy_keys(k: int) -> tuple[str, ...]:
    """The evaluation sums a noisy release carries, at cutoff ``k``."""
    return tuple(key.format(k=k) for key in NOISY_KEYS)


def evaluation_sensitivity(k: int) -> float:
    """L2 sensitivity of :func:`noisy_keys` under zero-out of one user: √(number of sums)."""
    return math.sqrt(len(noisy_keys(k)))


def noisy_evaluation(
    sums: Mapping[str, object], k: int, noise_multiplier: float, rng: np.random.Generator
) -> dict[str, float]:
    """The Gaussian mechanism on the evaluation sums: each gets N(0, (σ·Δ)²), Δ = √6.

    A user (zeroed or not) changes each of the six sums by at most 1, so the vector's
    L2 sensitivity is √6; the release is accounted as one Gaussian use with noise
    multiplier ``noise_multiplier`` (σ) and sampling rate 1.
    """
    if not noise_multiplier > 0:
        raise ValueError(f"a noisy evaluation needs a noise multiplier > 0, got {noise_multiplier}")
    std = noise_multiplier * evaluation_sensitivity(k)
    out = {}
    for key in noisy_keys(k):
        value = sums.get(key)
        if not isinstance(value, (int, float)):
            raise ValueError(f"evaluation sums lack {key!r}")
        out[key] = float(value) + float(rng.normal(0.0, std))
    return out


def noisy_summary(parts: Sequence[Mapping[str, Any]], k: int) -> dict[str, float]:
    """Metrics from silos' noisy sums: pooled, then ratios clamped to [0, 1] (post-processing)."""
    pooled = {key: float(sum(float(p[key]) for p in parts)) for key in noisy_keys(k)}
    out = {}
    for phase in ("val", "test"):
        users = max(pooled[f"{phase}-users"], 1.0)
        for name in (f"hits@{k}", f"ndcg@{k}"):
            out[f"{phase}-{name.replace('hits', 'hr')}"] = min(1.0, max(0.0, pooled[f"{phase}-{name}"] / users))
    return out


def noisy_problem(metrics: Mapping[str, object], k: int) -> str | None:
    """Why a noisy evaluation reply is unusable (a key missing or not finite), else None."""
    for key in noisy_keys(k):
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"noisy evaluation: '{key}' must be a finite number, got {value!r}"
    return None
