"""Privacy accounting for Poisson-subsampled Gaussian mechanisms.

A silo (or the server) keeps its *history* of mechanism uses, one
:class:`MechanismUse` per round it took part in. ε is never carried forward as a
number: it is recomputed by composing every step of the whole history, so an
accountant restored from node state, from disk or from a ledger gives exactly the
ε of a fresh accountant composed over all rounds.

The ε of record is dp-accounting's PLD accountant (tight); its RDP accountant is a
fast, conservative upper bound used to skip PLD work in budget checks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Literal

import dp_accounting
from dp_accounting import pld, rdp

AccountantName = Literal["pld", "rdp"]
# PLD discretisation: ε is an upper bound whose slack is about this interval per
# composition; 1e-4 is dp-accounting's default and keeps the error far below 0.01.
_PLD_INTERVAL = 1e-4
# Below this σ the PLD of a Gaussian needs a huge grid (minutes, tens of GB) while ε is
# already in the hundreds; such histories are accounted with RDP, a valid upper bound.
PLD_MIN_NOISE = 0.3
# Integer orders: dp-accounting's fractional-order series fails to converge (and
# warns) at the large sampling rates of small silos; integer orders are exact.
_RDP_ORDERS = list(range(2, 64)) + [80, 96, 128, 192, 256, 512, 1024]


@dataclass(frozen=True, slots=True)
class MechanismUse:
    """``steps`` compositions of a Poisson-subsampled Gaussian mechanism.

    ``noise_multiplier`` is σ (noise std / clip norm); ``sample_rate`` is the
    probability q with which each privacy unit enters a step. σ = 0 means no noise
    (ε = ∞); ``steps`` = 0 is allowed (a round that took no step).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")

    def dp_event(self) -> dp_accounting.DpEvent:
        """The dp-accounting event of these steps."""
        step: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sample_rate < 1.0:
            step = dp_accounting.PoissonSampledDpEvent(self.sample_rate, step)
        return dp_accounting.SelfComposedDpEvent(step, self.steps)

    def to_dict(self) -> dict[str, float | int]:
        """JSON-able form (the ledger/state format)."""
        return asdict(self)


def merged(uses: Iterable[MechanismUse]) -> list[MechanismUse]:
    """Merge uses with equal (σ, q) into one: composition is commutative."""
    steps: dict[tuple[float, float], int] = {}
    for use in uses:
        if use.steps:
            key = (use.noise_multiplier, use.sample_rate)
            steps[key] = steps.get(key, 0) + use.steps
    return [MechanismUse(s, q, n) for (s, q), n in steps.items()]


def epsilon(
    uses: Sequence[MechanismUse], delta: float, accountant: AccountantName = "pld"
) -> float:
    """ε at ``delta`` of composing every step of ``uses`` (0.0 for no steps).

    With ``pld``, a history with σ < :data:`PLD_MIN_NOISE` is accounted with RDP.
    """
    parts = tuple(merged(uses))
    if not parts:
        return 0.0
    if any(u.noise_multiplier == 0.0 for u in parts):
        return math.inf
    if accountant == "pld" and min(u.noise_multiplier for u in parts) < PLD_MIN_NOISE:
        accountant = "rdp"
    return _epsilon_cached(parts, delta, accountant)


@lru_cache(maxsize=4096)
def _epsilon_cached(
    parts: tuple[MechanismUse, ...], delta: float, accountant: AccountantName
) -> float:
    acc = _fresh(accountant)
    for use in parts:
        acc.compose(use.dp_event())
    return float(acc.get_epsilon(delta))


def _fresh(accountant: AccountantName) -> dp_accounting.PrivacyAccountant:
    if accountant == "pld":
        return pld.PLDAccountant(value_discretization_interval=_PLD_INTERVAL)
    if accountant == "rdp":
        return rdp.RdpAccountant(_RDP_ORDERS)
    raise ValueError(f"unknown accountant {accountant!r}; use 'pld' or 'rdp'")


def would_exceed(
    spent: Sequence[MechanismUse],
    planned: MechanismUse,
    delta: float,
    budget: float,
    accountant: AccountantName = "pld",
) -> tuple[bool, float]:
    """Whether composing ``planned`` after ``spent`` takes ε above ``budget``.

    Returns ``(exceeds, ε_after)``. RDP upper-bounds PLD, so when the RDP ε fits the
    budget the (slower) accountant of record is not consulted for the decision.
    """
    after = [*spent, planned]
    if accountant == "pld":
        fast = epsilon(after, delta, "rdp")
        if fast <= budget:
            return False, epsilon(after, delta, "pld")
    eps = epsilon(after, delta, accountant)
    return eps > budget, eps


@lru_cache(maxsize=256)
def calibrate_noise(
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    accountant: AccountantName = "pld",
) -> float:
    """The smallest σ (to 1e-3 relative) for which ``steps`` steps at rate q stay within ε.

    Raises
    ------
    ValueError
        If the target cannot be met with σ ≤ 1000.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    if steps == 0:
        return 0.0

    def event(sigma: float) -> dp_accounting.DpEvent:
        return MechanismUse(sigma, sample_rate, steps).dp_event()

    def calibrate(name: AccountantName, bracket: dp_accounting.BracketInterval) -> float:
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: _fresh(name), event, target_epsilon, delta, bracket, tol=1e-3
            )
        )

    try:
        # RDP is cheap at any σ and never below PLD, so its σ brackets PLD's from above;
        # PLD is slow (and memory-hungry) at tiny σ, so it never searches below σ_rdp / 4.
        sigma = calibrate("rdp", dp_accounting.LowerEndpointAndGuess(1e-3, 1.0))
        if accountant == "pld":
            sigma = calibrate("pld", dp_accounting.ExplicitBracketInterval(sigma / 4, sigma))
    except (ValueError, RuntimeError) as exc:
        raise ValueError(
            f"cannot reach ε={target_epsilon} at δ={delta:g} with q={sample_rate:g} "
            f"over {steps} steps: {exc}"
        ) from exc
    # calibrate returns a value within tol of the boundary: make sure it is on the safe side.
    while epsilon([MechanismUse(sigma, sample_rate, steps)], delta, accountant) > target_epsilon:
        sigma *= 1.001
    return float(sigma)


def default_delta(num_units: int) -> float:
    """δ = 1 / N^1.1 for a population of ``num_units`` privacy units."""
    if num_units < 1:
        raise ValueError(f"population must be >= 1 unit, got {num_units}")
    return float(num_units ** -1.1)
