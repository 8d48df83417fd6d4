"""Small argument validators shared by the empirical privacy estimators."""

from __future__ import annotations

import math

import numpy as np


def check_count(name: str, value: int, minimum: int) -> None:
    """Reject a non-int (or bool) count, or one below ``minimum``, naming it."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_unit_open(name: str, value: float) -> None:
    """Reject a value outside the open interval (0, 1), naming it."""
    if isinstance(value, bool) or not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be a finite number in (0, 1), got {value!r}")


def check_delta(delta: float) -> None:
    """Reject a δ outside [0, 1)."""
    if isinstance(delta, bool) or not (math.isfinite(delta) and 0.0 <= delta < 1.0):
        raise ValueError(f"delta must be a finite number in [0, 1), got {delta!r}")
