"""Pure functions of the Gaussian mechanism over model updates: norms, clipping, noise.

An update is a mapping of parameter name to array; its norm is the L2 norm of all
its entries together (the flattened model), as in DP-FedAvg (McMahan et al. 2018).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

Update = Mapping[str, NDArray[np.float64]]


def l2_norm(update: Update) -> float:
    """L2 norm of the whole update."""
    return math.sqrt(sum(float(np.square(v).sum()) for v in update.values()))


def clip_update(update: Update, clip: float) -> tuple[dict[str, NDArray[np.float64]], float]:
    """``update`` scaled to L2 norm at most ``clip``; returns it and the original norm.

    Notes
    -----
    After clipping, adding or removing one update changes a sum of updates by at
    most ``clip`` in L2 norm: the sum's sensitivity under add/remove adjacency.
    """
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    norm = l2_norm(update)
    factor = min(1.0, clip / (norm + 1e-12))
    return {k: factor * v for k, v in update.items()}, norm


def gaussian_noise(
    shapes: Mapping[str, tuple[int, ...]], std: float, rng: np.random.Generator
) -> dict[str, NDArray[np.float64]]:
    """Independent N(0, std²) entries for every parameter, drawn in the order of ``shapes``."""
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    return {k: rng.normal(0.0, std, size=shape) for k, shape in shapes.items()}
