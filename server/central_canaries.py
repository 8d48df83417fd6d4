"""Canary clients for auditing client-level DP (Andrew et al., 2024, one-shot estimate).

Each canary is a simulated member of the population with a fixed random unit
direction c_i, sampled like a real silo; a sampled canary contributes S·c_i (what
clipping makes of a huge update along c_i). After training, the cosine of every c_i
with the model's total change is the input of
:func:`common.privacy.one_shot.one_shot_epsilon`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from numpy.typing import NDArray


class CanaryClients:
    """``count`` canary clients with directions drawn from ``seed``."""

    def __init__(self, count: int, seed: int) -> None:
        self.count = count
        self._rng = np.random.default_rng(seed)
        self._directions: NDArray[np.float32] | None = None  # (count, d)

    def directions(self, shapes: dict[str, tuple[int, ...]]) -> NDArray[np.float32]:
        """The unit directions over the flattened model (names sorted), drawn once."""
        if self._directions is None:
            dim = sum(int(np.prod(s)) for s in shapes.values())
            d = self._rng.standard_normal((self.count, dim), dtype=np.float32)
            d /= np.linalg.norm(d, axis=1, keepdims=True)
            self._directions = d
        return self._directions

    def add_sampled(
        self, total: dict[str, NDArray[np.float64]], clip: float, sample_rate: float, rng: np.random.Generator
    ) -> None:
        """Add S·c_i to ``total`` for each canary Poisson-sampled (rate q) this round."""
        names = sorted(total)
        directions = self.directions({k: total[k].shape for k in names})
        chosen = rng.random(self.count) < sample_rate
        flat = clip * directions[chosen].sum(0, dtype=np.float64)
        offset = 0
        for k in names:
            size = total[k].size
            total[k] += flat[offset : offset + size].reshape(total[k].shape)
            offset += size

    def cosines(self, initial: ArrayRecord, final: ArrayRecord) -> dict[str, Any]:
        """Cosine of each canary direction with the model's total change (``central-canaries.json``)."""
        names = sorted(initial)
        change = np.concatenate(
            [(final[k].numpy().astype(np.float64) - initial[k].numpy()).ravel() for k in names]
        )
        directions = self.directions({k: tuple(initial[k].shape) for k in names})
        cosines = directions.astype(np.float64) @ change / (np.linalg.norm(change) + 1e-30)
        return {"cosines": cosines.tolist(), "dim": int(change.size), "canaries": self.count}
