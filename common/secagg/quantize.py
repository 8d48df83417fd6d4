"""Quantisation of float vectors into Z_M for secure summation: an exact release, a stated error.

The grid. ``r`` bounds one silo's coordinate in normal operation, so the sum of at most
``S`` silos lies in ``[−S·r, S·r]``. The modulus is ``M = 2^32`` (the integers travel as
uint32 and numpy's wrap-around *is* arithmetic mod M); the grid step is
``Δ = S·r / G`` with ``G = 2^30`` steps (:attr:`QuantSpec.steps`), so the decoded sum
fills a quarter of Z_M on each side of 0 and the rest is a guard band.

Each silo sends ``k = ⌊y/Δ + u + ½⌋ mod M`` for its vector ``y`` — no clipping — where
``u`` is its **zero-sum dither**: ``u_a = Σ_{b ≠ a} ±d_ab`` over the other silos it masked
with, ``d_ab`` uniform in [0, 1) from the ECDH secret the pair already shares for its
masks (+ if a > b), so that the silos' dithers sum to exactly 0 and the server knows none
of them (:func:`common.secagg.protocol.pairwise_streams`).

Why the release is exact (Lemma). Let n silos send ``⌊b_s + u_s⌋`` where ``Σ u_s = 0`` and
any n − 1 of the ``u_s`` are independent and uniform mod 1, independently of the ``b``.
Then the fractional parts ``F_s = frac(b_s + u_s)``, s < n, are iid uniform and
independent of the ``b``, and since ``Σ(b_s + u_s) = B := Σ b_s``,

    Σ_s ⌊b_s + u_s⌋ = B − Σ_{s<n} F_s − frac(B − Σ_{s<n} F_s) = ⌊B − V⌋,

``V = Σ_{s<n} F_s`` independent of the data. So the integer sum is a randomised function
of the exact sum ``B`` alone: whatever the silos' individual vectors, it is
post-processing of Σ y — for distributed DP, of the Gaussian mechanism's own output (sum
of clipped contributions plus the noise shares), and nothing of the rounding enters the
accounting. A dither the adversary knows (a colluding silo's pairs; a dropped silo's
pairs, whose keys the server reconstructs) is a known shift of ``b_s``, and the Lemma
holds over the honest survivors' dithers; with one honest survivor it is plain
rounding of that silo's value, again post-processing. The server subtracts the dithers
it knows (the dropped silos' pairs: ``offset``); decoding (sign, ×Δ) and the range check
are post-processing too.

Error bound. Each silo's ``⌊a + ½⌋`` is within ½ of ``a``, so the decoded sum of ``n``
silos is within ``n·Δ/2`` of the exact sum per coordinate, and it is unbiased:
E⌊B − V⌋ = B − n/2 = Σ y_s/Δ for n ≥ 2, with b_s = y_s/Δ + ½.
:meth:`QuantSpec.sum_error_bound` adds ``n·Δ·2^−20`` for float64's rounding of
``y/Δ + u + ½``, whose magnitude is below 2^31 in range.

Range. The sum leaves ``[−S·r, S·r]`` only if the exact sum does (``r`` from
:func:`range_for`: probability ≤ its ``failure_probability``). A sum up to 3·S·r in
magnitude then lands in the guard band and is refused (:func:`dequantise_sum`); so is the
near-uniform value of a sum whose masks were not removed. A silo's coordinates beyond
``r`` are counted (``Quantised.beyond``, kept in the silo) but not clipped: the sum of
the others may still leave room.

Arithmetic model: the Lemma and the Gaussian mechanism are stated over the reals, as
every DP-SGD implementation states its float noise; fedrec computes in float64, and the
dither's 2^−32 resolution is finer than float64's at the grid's magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MODULUS_BITS = 32
GRID_STEPS = 2**30  # steps of the grid covering [0, S·r]: a quarter of Z_2^32 on each side of 0
# float64 rounding of y/Δ + u + ½ at magnitude < 2^31: at most 3 roundings of 2^−23 each
_FLOAT_SLACK = 2.0**-20
_EXACT = 2.0**52  # beyond this float64 has no fractional bits: the floor is meaningless


class QuantisationError(ValueError):
    """Quantisation parameters or inputs are invalid (names the parameter)."""


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """Per-silo range ``r``, modulus ``2^modulus_bits`` (32) and the number of silos ``S``."""

    clip_range: float
    modulus_bits: int
    max_silos: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise QuantisationError(f"clip_range: must be a finite number > 0, got {self.clip_range!r}")
        if self.modulus_bits != MODULUS_BITS:
            raise QuantisationError(
                f"modulus_bits: must be {MODULUS_BITS}, got {self.modulus_bits!r} (a wider grid is finer than "
                "float64 can hold at the dither's resolution)"
            )
        if not 1 <= self.max_silos <= GRID_STEPS // 4:
            raise QuantisationError(f"max_silos: must be in 1..{GRID_STEPS // 4}, got {self.max_silos!r}")

    @property
    def modulus(self) -> int:
        """M = 2^32."""
        return 1 << self.modulus_bits

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The unsigned integer type whose wrap-around is arithmetic mod M."""
        return np.uint32

    @property
    def sum_range(self) -> float:
        """S·r: the decoded sum of at most S silos covers [−S·r, S·r]."""
        return self.max_silos * self.clip_range

    @property
    def steps(self) -> int:
        """G: grid steps from 0 to S·r."""
        return GRID_STEPS

    @property
    def step(self) -> float:
        """Δ = S·r / G, the grid step."""
        return self.sum_range / self.steps

    def sum_error_bound(self, num_summed: int) -> float:
        """Strict bound on |decoded sum − exact sum| per coordinate for n silos: n·Δ·(½ + 2^−20)."""
        if not 1 <= num_summed <= self.max_silos:
            raise QuantisationError(f"num_summed: must be in 1..{self.max_silos}, got {num_summed!r}")
        return num_summed * self.step * (0.5 + _FLOAT_SLACK)


@dataclass(frozen=True, slots=True)
class Quantised:
    """A quantised vector in Z_M and how many of its coordinates lay beyond ±r (not clipped)."""

    values: np.ndarray
    beyond: int


def quantise(vector: np.ndarray, spec: QuantSpec, dither: np.ndarray | float = 0.0) -> Quantised:
    """``⌊y/Δ + dither + ½⌋ mod M`` per coordinate (uint32); ``dither`` is the silo's zero-sum dither."""
    y = np.asarray(vector, dtype=np.float64).ravel()
    if not np.all(np.isfinite(y)):
        raise QuantisationError(f"vector: {int(np.sum(~np.isfinite(y)))} coordinates are NaN or infinite")
    u = np.asarray(dither, dtype=np.float64)
    if u.ndim and u.shape != y.shape:
        raise QuantisationError(f"dither: shape {u.shape}, expected {y.shape} (one per coordinate)")
    a = y / spec.step + u + 0.5
    huge = int(np.count_nonzero(np.abs(a) >= _EXACT))
    if huge:
        raise QuantisationError(
            f"vector: {huge} coordinates are beyond 2^52 grid steps (|y| up to {float(np.abs(y).max()):.3g}, "
            f"range r = {spec.clip_range:.3g}); the sum cannot hold them"
        )
    k = np.floor(a).astype(np.int64)
    beyond = int(np.count_nonzero(np.abs(y) > spec.clip_range))
    return Quantised(values=k.astype(np.uint64).astype(spec.dtype), beyond=beyond)  # two's complement: mod M


def dequantise_sum(
    total: np.ndarray, spec: QuantSpec, num_summed: int, offset: np.ndarray | float = 0.0
) -> np.ndarray:
    """The float sum of ``num_summed`` silos' vectors from their integer sum mod M.

    ``offset``: the part of the summed dithers the server knows (the dropped silos' pairs),
    subtracted before scaling. A coordinate beyond the grid's ±G steps (plus the n/2 of
    rounding) means the sum overflowed S·r or its masks were not removed: refused.
    """
    if not 1 <= num_summed <= spec.max_silos:
        raise QuantisationError(f"num_summed: must be in 1..{spec.max_silos}, got {num_summed!r}")
    k = np.asarray(total)
    if k.dtype != spec.dtype:
        raise QuantisationError(f"total: expected dtype {np.dtype(spec.dtype).name}, got {k.dtype.name}")
    signed = k.astype(np.int64)
    signed[signed >= spec.modulus // 2] -= spec.modulus
    value = signed.astype(np.float64) - np.asarray(offset, dtype=np.float64)
    outside = int(np.count_nonzero(np.abs(value) > spec.steps + num_summed))
    if outside:
        raise QuantisationError(
            f"total: {outside} of {value.size} coordinates lie beyond ±S·r = ±{spec.sum_range:.4g}: the sum "
            "overflowed its range, or it does not come from that many quantised vectors (masks not removed?)"
        )
    return value * spec.step


def range_for(max_abs_signal: float, noise_std: float, coordinates: int, failure_probability: float = 1e-9) -> float:
    """A per-silo range r that a silo's (signal + Gaussian noise share) exceeds with tiny probability.

    ``max_abs_signal`` bounds one silo's noiseless coordinate (e.g. the sum of its
    sampled users' clipped deltas: at most C times that silo's sampled users); the
    noise share has std ``noise_std`` per coordinate. r = max_abs_signal + z·noise_std
    with z chosen so that a union bound over ``coordinates`` coordinates gives
    P(any coordinate beyond r) ≤ ``failure_probability``; the sum of S such silos then
    stays within S·r with at least that probability.
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
