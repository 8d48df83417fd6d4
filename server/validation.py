"""Checks of what a silo sends: shared arrays against the model sent, weights, privacy records.

Each check returns a reason (a sentence naming what is wrong) or None; the strategy
rejects and records a reply with a reason instead of letting it reach aggregation.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from common import records
from common.privacy.events import PrivacyRelease, ReleaseError


def arrays_problem(got: ArrayRecord, current: ArrayRecord) -> str | None:
    """Why ``got`` is not a model of the same parameters as ``current`` (names, shapes, dtypes)."""
    if set(got) != set(current):
        extra = sorted(set(got) - set(current))
        missing = sorted(set(current) - set(got))
        return f"parameter names differ (unexpected {extra}, missing {missing})"
    for name, ref in current.items():
        arr = got[name]
        if tuple(arr.shape) != tuple(ref.shape) or arr.dtype != ref.dtype:
            return f"{name}: shape/dtype {arr.shape}/{arr.dtype}, expected {ref.shape}/{ref.dtype}"
    return None


def nonfinite_problem(arrays: ArrayRecord) -> str | None:
    """The first parameter holding NaN or an infinity, as a reason."""
    for name, arr in arrays.items():
        if not np.isfinite(arr.numpy()).all():
            return f"{name}: contains NaN or infinite values"
    return None


def update_problem(content: RecordDict, current: ArrayRecord | None) -> str | None:
    """Why a training reply's update cannot be aggregated, or None when it can."""
    if current is None:
        return "no shared model was sent this round"
    if records.ARRAYS not in content.array_records:
        return "reply has no shared parameters"
    got = content.array_records[records.ARRAYS]
    problem = arrays_problem(got, current) or nonfinite_problem(got)
    if problem is not None:
        return problem
    metrics = content.metric_records.get(records.METRICS)
    if metrics is None or records.NUM_EXAMPLES not in metrics:
        return f"reply has no '{records.NUM_EXAMPLES}'"
    weight = metrics[records.NUM_EXAMPLES]
    if not isinstance(weight, (int, float)) or not weight > 0:
        return f"'{records.NUM_EXAMPLES}' must be positive, got {weight!r}"
    return None


def privacy_release(content: RecordDict) -> tuple[PrivacyRelease | None, str | None]:
    """The reply's privacy release (None when it carries none) or why it is invalid."""
    if records.PRIVACY not in content.config_records:
        return None, None
    try:
        return PrivacyRelease.from_json(dict(content.config_records[records.PRIVACY])), None
    except ReleaseError as exc:
        return None, f"privacy record invalid: {exc}"
