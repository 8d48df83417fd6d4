"""Quantisation of float vectors into Z_M for secure summation, with a stated error bound.

A silo's vector ``y`` (float, any length) is clipped to ``[-r, r]`` per coordinate,
shifted to ``[0, 2r]`` and stochastically rounded onto the grid of ``L + 1`` points
``0, Δ, 2Δ, …, LΔ`` with ``Δ = 2r / L``: each coordinate becomes an integer
``k ∈ {0, …, L}``, rounded up with probability equal to its fractional part (so
``E[kΔ − r] = clip(y)``). The modulus is ``M = 2^b`` (``b`` = 32 or 64: the integers
travel as uint32/uint64 and numpy's wrap-around *is* arithmetic mod M).

Overflow is impossible by construction: ``L = ⌊min(M − 1, 2^53) / S⌋`` (2^53 so that
float64 holds every integer sum exactly), so the integer sum of at most ``S`` silos' vectors is
at most ``S·L ≤ M − 1 < M`` and reducing it mod M changes nothing.

Error bound: each silo's rounding moves a coordinate by less than one grid step, so
for ``n ≤ S`` silos the decoded sum differs from the sum of their *clipped* vectors by
less than ``n·Δ = 2·n·r / L`` per coordinate (:meth:`QuantSpec.sum_error_bound`); the
rounding errors are independent with mean 0 and std ≤ Δ/2, so the typical error is
about ``√n·Δ/2``. Clipping is the caller's business: it reports how many coordinates
were clipped, and ``r`` must be chosen so that clipping does not happen in normal
operation (see :func:`range_for`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# float64 holds integers exactly up to 2^53: the decoded integer sum S·L must stay below it.
_MAX_SUM = 2**53


class QuantisationError(ValueError):
    """Quantisation parameters or inputs are invalid (names the parameter)."""


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """Clipping range ``r``, modulus ``2^modulus_bits`` and the number of silos ``S``."""

    clip_range: float
    modulus_bits: int
    max_silos: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise QuantisationError(f"clip_range: must be a finite number > 0, got {self.clip_range!r}")
        if self.modulus_bits not in (32, 64):
            raise QuantisationError(f"modulus_bits: must be 32 or 64, got {self.modulus_bits!r}")
        if self.max_silos < 1:
            raise QuantisationError(f"max_silos: must be >= 1, got {self.max_silos!r}")
        if self.levels < 2:
            raise QuantisationError(
                f"max_silos: {self.max_silos} silos leave fewer than 2 levels in Z_2^{self.modulus_bits}"
            )

    @property
    def modulus(self) -> int:
        """M = 2^modulus_bits."""
        return 1 << self.modulus_bits

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The unsigned integer type whose wrap-around is arithmetic mod M."""
        return np.uint32 if self.modulus_bits == 32 else np.uint64

    @property
    def levels(self) -> int:
        """L = ⌊min(M − 1, 2^53) / S⌋: the largest grid index, so that S·L < M (and exact in float64)."""
        return min(self.modulus - 1, _MAX_SUM) // self.max_silos

    @property
    def step(self) -> float:
        """Δ = 2r / L, the grid step."""
        return 2.0 * self.clip_range / self.levels

    def sum_error_bound(self, num_summed: int) -> float:
        """Strict bound on |decoded sum − sum of clipped inputs| per coordinate: n·Δ."""
        if not 1 <= num_summed <= self.max_silos:
            raise QuantisationError(f"num_summed: must be in 1..{self.max_silos}, got {num_summed!r}")
        return num_summed * self.step


@dataclass(frozen=True, slots=True)
class Quantised:
    """A quantised vector and how many of its coordinates were clipped to ±r."""

    values: np.ndarray
    clipped: int


def quantise(vector: np.ndarray, spec: QuantSpec, rng: np.random.Generator) -> Quantised:
    """Clip ``vector`` to [-r, r], stochastically round onto the grid; integers in 0..L."""
    y = np.asarray(vector, dtype=np.float64).ravel()
    if not np.all(np.isfinite(y)):
        raise QuantisationError(f"vector: {int(np.sum(~np.isfinite(y)))} coordinates are NaN or infinite")
    r = spec.clip_range
    clipped = int(np.count_nonzero(np.abs(y) > r))
    scaled = (np.clip(y, -r, r) + r) * (spec.levels / (2.0 * r))
    floor = np.floor(scaled)
    up = rng.random(y.shape) < (scaled - floor)
    k = np.minimum(floor + up, spec.levels)  # float rounding can put scaled a hair above L
    return Quantised(values=k.astype(spec.dtype), clipped=clipped)


def dequantise_sum(total: np.ndarray, spec: QuantSpec, num_summed: int) -> np.ndarray:
    """The float sum of ``num_summed`` silos' vectors from the integer sum mod M."""
    if not 1 <= num_summed <= spec.max_silos:
        raise QuantisationError(f"num_summed: must be in 1..{spec.max_silos}, got {num_summed!r}")
    k = np.asarray(total)
    if k.dtype != spec.dtype:
        raise QuantisationError(f"total: expected dtype {np.dtype(spec.dtype).name}, got {k.dtype.name}")
    if np.any(k > num_summed * spec.levels):
        raise QuantisationError(
            f"total: values above {num_summed}·L = {num_summed * spec.levels}; "
            "the sum does not come from that many quantised vectors (masks not removed?)"
        )
    return k.astype(np.float64) * spec.step - num_summed * spec.clip_range


def range_for(max_abs_signal: float, noise_std: float, coordinates: int, failure_probability: float = 1e-9) -> float:
    """A clipping range r that a silo's (signal + Gaussian noise share) exceeds with tiny probability.

    ``max_abs_signal`` bounds one silo's noiseless coordinate (e.g. the sum of its
    sampled users' clipped deltas: at most C times that silo's sampled users); the
    noise share has std ``noise_std`` per coordinate. r = max_abs_signal + z·noise_std
    with z chosen so that a union bound over ``coordinates`` coordinates gives
    P(any coordinate clipped) ≤ ``failure_probability``.
    """
    if max_abs_signal < 0 or noise_std < 0 or coordinates < 1 or not 0 < failure_probability < 1:
        raise QuantisationError(
            "range_for: needs max_abs_signal >= 0, noise_std >= 0, coordinates >= 1, 0 < failure_probability < 1"
        )
    from statistics import NormalDist

    z = -NormalDist().inv_cdf(failure_probability / (2 * coordinates))
    r = max_abs_signal + z * noise_std
    if r <= 0:
        raise QuantisationError("range_for: signal bound and noise are both 0; give a positive range")
    return r
