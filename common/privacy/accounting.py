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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final, Literal, cast

import dp_accounting
from dp_accounting import pld, rdp

from common.errors import ConfigError
from common.privacy.events import (
    BUDGET_DECLINE,
    DP_EVALUATION,
    DP_FEDAVG,
    DP_SGD,
    MechanismUse,
    PrivacyRelease,
)

AccountantName = Literal["pld", "rdp"]
# PLD discretisation: ε is an upper bound whose slack is about this interval per
# composition; 1e-4 is dp-accounting's default and keeps the error far below 0.01.
_PLD_INTERVAL = 1e-4
# Below this σ the PLD of a Gaussian needs a huge grid (minutes, tens of GB) while ε is
# already in the hundreds; such histories are accounted with RDP, a valid upper bound.
PLD_MIN_NOISE = 0.3
# Integer orders: dp-accounting's fractional-order series fails to converge (and
# warns) at the large sampling rates of small silos; integer orders are exact.
# events.RELATION ("zero-out"): one unit's data replaced by none, the roster N public.
NEIGHBOURING_RELATION: Final = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
_RDP_ORDERS = list(range(2, 64)) + [80, 96, 128, 192, 256, 512, 1024]


def dp_event(use: MechanismUse) -> dp_accounting.DpEvent:
    """The dp-accounting event of ``use``'s steps."""
    step: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(use.noise_multiplier)
    if use.sample_rate < 1.0:
        step = dp_accounting.PoissonSampledDpEvent(use.sample_rate, step)
    return dp_accounting.SelfComposedDpEvent(step, use.steps)


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
        acc.compose(dp_event(use))
    return float(acc.get_epsilon(delta))


def _fresh(accountant: AccountantName) -> dp_accounting.PrivacyAccountant:
    """A new dp-accounting accountant (the one PLD interval, the one RDP order list)."""
    if accountant == "pld":
        return pld.PLDAccountant(NEIGHBOURING_RELATION, value_discretization_interval=_PLD_INTERVAL)
    if accountant == "rdp":
        return rdp.RdpAccountant(_RDP_ORDERS, NEIGHBOURING_RELATION)
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
    extra: tuple[MechanismUse, ...] = (),
) -> float:
    """The smallest σ (to 1e-3 relative) for which ``steps`` steps at rate q stay within ε.

    ``extra`` are planned uses of fixed σ composed with them (a silo's noisy
    evaluations): the budget covers both.

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
        main = dp_event(MechanismUse(sigma, sample_rate, steps))
        return dp_accounting.ComposedDpEvent([main, *(dp_event(u) for u in extra)]) if extra else main

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
    while epsilon([MechanismUse(sigma, sample_rate, steps), *extra], delta, accountant) > target_epsilon:
        sigma *= 1.001
    return float(sigma)


@lru_cache(maxsize=256)
def _curve_cached(parts: tuple[MechanismUse, ...], deltas: tuple[float, ...]) -> tuple[tuple[float, float], ...]:
    if any(u.noise_multiplier == 0 for u in parts):
        return tuple((d, math.inf) for d in deltas)
    name: AccountantName = "pld" if min(u.noise_multiplier for u in parts) >= PLD_MIN_NOISE else "rdp"
    acc = _fresh(name)
    for use in parts:
        acc.compose(dp_event(use))
    return tuple((d, float(acc.get_epsilon(d))) for d in deltas)


def epsilon_delta_curve(uses: Sequence[MechanismUse], deltas: Sequence[float]) -> list[tuple[float, float]]:
    """``(δ, ε(δ))`` for each δ from one composed PLD (RDP below PLD's σ range)."""
    return list(_curve_cached(tuple(merged(uses)), tuple(float(d) for d in deltas)))


# δ is the probability that the guarantee fails outright; a mechanism that publishes
# one unit's data at random with probability δ is (0, δ)-DP, so δ must be far below 1/N.
DELTA_CAP = 1e-5


def default_delta(num_units: int) -> float:
    """δ = min(1e-5, 1/(10·N)) for a population of ``num_units`` privacy units.

    A mechanism that releases each unit's data in the clear with probability δ is
    (0, δ)-DP; with δ = 1/(10N) the expected number of units so exposed is 0.1.
    """
    if num_units < 1:
        raise ValueError(f"population must be >= 1 unit, got {num_units}")
    return min(DELTA_CAP, 1.0 / (10 * num_units))


@dataclass(frozen=True, slots=True)
class DeltaChoice:
    """The δ of one mechanism, how it was chosen, and the warning to log (if any)."""

    delta: float
    rule: str  # the release's ``delta-rule``
    warning: str | None = None  # a configured δ above 1/(10N): accepted, but weak


def choose_delta(configured: float, num_units: int, *, key: str, units: str, owner: str) -> DeltaChoice:
    """The δ of a mechanism over ``num_units`` units: ``configured``, or the default if 0.

    Parameters
    ----------
    configured : float
        The configured δ (``privacy.local.delta`` or ``privacy.central.delta``); 0 means
        :func:`default_delta`.
    num_units : int
        N, the population of privacy units (a silo's users or interactions; the silos).
    key : str
        The configuration key, named in errors and warnings.
    units : str
        What the N units are, for messages and the rule ("the silo's N users").
    owner : str
        Who fixes the mechanism ("silo 3", "the server"), named in errors and warnings.

    Returns
    -------
    DeltaChoice
        The default δ with rule "min(1e-5, 1/(10N)) for <units>"; a configured δ up to
        1/(10N) with rule "configured"; a configured δ in (1/(10N), 1/N) with a rule and
        a warning saying it is weak.

    Raises
    ------
    ConfigError
        If the configured δ is ≥ 1/N: such a δ allows a mechanism that publishes some
        unit's data outright.
    """
    if num_units < 1:
        raise ValueError(f"population must be >= 1 unit, got {num_units}")
    if not configured:
        return DeltaChoice(default_delta(num_units), f"min(1e-5, 1/(10N)) for {units}")
    inverse, tenth = 1.0 / num_units, 1.0 / (10 * num_units)
    if configured >= inverse:
        raise ConfigError(
            f"{owner}: {key} = {configured:g} is not below 1/N = {inverse:.3g} for N = {num_units} "
            f"({units}): a δ that large allows publishing some unit's data outright. "
            f"Set {key} at most 1/(10N) = {tenth:.3g}, or 0 for min(1e-5, 1/(10N)) = "
            f"{default_delta(num_units):.3g}"
        )
    if configured > tenth:
        return DeltaChoice(
            configured,
            f"configured (above 1/(10N) = {tenth:.3g} for {units}: weak)",
            f"{owner}: {key} = {configured:g} is above 1/(10N) = {tenth:.3g} for N = {num_units} "
            f"({units}): accepted, but weak (N·δ = {num_units * configured:.3g}); the release "
            "records it in its delta-rule",
        )
    return DeltaChoice(configured, "configured")


@dataclass(slots=True)
class Accountant:
    """One owner's privacy accountant: its mechanism for the run and every use so far.

    Used by a silo (local DP-SGD: unit user or interaction), by the server (central
    DP-FedAvg: unit client) and by the audit (rebuilt from a ledger). ε is never
    carried forward: :meth:`epsilon` composes every step of :attr:`uses`.
    """

    owner: str
    unit: str
    population: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    clip: float
    delta: float
    delta_rule: str
    accountant: AccountantName
    target_epsilon: float  # 0 = no budget
    released: str  # what each use's output is
    expected_batch_size: int | None = None
    rounds: list[int] = field(default_factory=list)
    uses: list[MechanismUse] = field(default_factory=list)

    def epsilon(self, accountant: AccountantName | None = None) -> float:
        """ε at δ over every step so far (the accountant of record unless named)."""
        return epsilon(self.uses, self.delta, accountant or self.accountant)

    def planned(self) -> MechanismUse:
        """The mechanism use of one more round."""
        return MechanismUse(self.noise_multiplier, self.sample_rate, self.steps_per_round)

    def would_exceed(self) -> tuple[bool, float]:
        """``(exceeds, ε after)`` for one more round against :attr:`target_epsilon`."""
        if self.target_epsilon <= 0:
            return False, math.nan
        return would_exceed(self.uses, self.planned(), self.delta, self.target_epsilon, self.accountant)

    def record(self, server_round: int, use: MechanismUse) -> None:
        """Count one round's use."""
        self.rounds.append(server_round)
        self.uses.append(use)

    def release(self, server_round: int, *, epsilon_if_trained: float | None = None) -> PrivacyRelease:
        """The release of ``server_round``: its recorded use, or a decline.

        A round is a decline when it is not the last recorded round;
        ``epsilon_if_trained`` is then what one more round would have cost.
        """
        trained = bool(self.rounds) and self.rounds[-1] == server_round
        return PrivacyRelease(
            **self._shared_fields(server_round),
            kind=self.kind if trained else BUDGET_DECLINE,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            clip=self.clip,
            steps=self.uses[-1].steps if trained else 0,
            released=self.released,
            epsilon_if_trained=None if trained else epsilon_if_trained,
            expected_batch_size=self.expected_batch_size,
        )

    def _shared_fields(self, server_round: int) -> dict[str, Any]:
        """The fields every release of this owner has in common (ε after every use so far)."""
        return {
            "owner": self.owner,
            "server_round": server_round,
            "unit": self.unit,
            "accountant": self.accountant,
            "delta": self.delta,
            "delta_rule": self.delta_rule,
            "epsilon": self.epsilon(),
            "target_epsilon": self.target_epsilon,
            "population": self.population,
            "total_steps": sum(u.steps for u in self.uses),
            "rounds_trained": len(self.rounds),
        }

    @property
    def kind(self) -> str:
        """The kind of this owner's mechanism events."""
        return DP_FEDAVG if self.unit == "client" else DP_SGD

    # ------------------------------------------------------------ state
    def to_json(self) -> dict[str, Any]:
        """The state form (node state, a silo's ``accountant.json``)."""
        out: dict[str, Any] = {
            "owner": self.owner,
            "unit": self.unit,
            "population": self.population,
            "sample-rate": self.sample_rate,
            "steps-per-round": self.steps_per_round,
            "noise-multiplier": self.noise_multiplier,
            "clip": self.clip,
            "delta": self.delta,
            "delta-rule": self.delta_rule,
            "accountant": self.accountant,
            "target-epsilon": self.target_epsilon,
            "released": self.released,
            "rounds": list(self.rounds),
            "use-noise-multipliers": [u.noise_multiplier for u in self.uses],
            "use-sample-rates": [u.sample_rate for u in self.uses],
            "use-steps": [u.steps for u in self.uses],
        }
        if self.expected_batch_size is not None:
            out["expected-batch-size"] = self.expected_batch_size
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Accountant:
        """Inverse of :meth:`to_json`.

        Raises
        ------
        ValueError
            Naming the field that is missing or malformed.
        """
        try:
            uses = [
                MechanismUse(float(s), float(q), int(n))
                for s, q, n in zip(
                    data["use-noise-multipliers"], data["use-sample-rates"], data["use-steps"], strict=True
                )
            ]
            batch = data.get("expected-batch-size")
            return cls(
                owner=str(data["owner"]),
                unit=str(data["unit"]),
                population=int(data["population"]),
                sample_rate=float(data["sample-rate"]),
                steps_per_round=int(data["steps-per-round"]),
                noise_multiplier=float(data["noise-multiplier"]),
                clip=float(data["clip"]),
                delta=float(data["delta"]),
                delta_rule=str(data["delta-rule"]),
                accountant=cast(AccountantName, str(data["accountant"])),
                target_epsilon=float(data["target-epsilon"]),
                released=str(data["released"]),
                expected_batch_size=None if batch is None else int(batch),
                rounds=[int(r) for r in data["rounds"]],
                uses=uses,
            )
        except KeyError as exc:
            raise ValueError(f"accountant state: missing field {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"accountant state: malformed ({exc})") from None

    @classmethod
    def from_releases(cls, releases: Sequence[PrivacyRelease], steps_per_round: int) -> Accountant:
        """Rebuild an accountant from an owner's releases in ledger order (at least one)."""
        if not releases:
            raise ValueError("an accountant needs at least one release to be rebuilt from")
        first = releases[0]
        acc = cls(
            owner=first.owner,
            unit=first.unit,
            population=first.population,
            sample_rate=first.sample_rate,
            steps_per_round=steps_per_round,
            noise_multiplier=first.noise_multiplier,
            clip=first.clip,
            delta=first.delta,
            delta_rule=first.delta_rule,
            accountant=cast(AccountantName, first.accountant),
            target_epsilon=first.target_epsilon,
            released=first.released,
            expected_batch_size=first.expected_batch_size,
        )
        for rel in releases:
            if rel.kind == DP_EVALUATION and rel.use is not None:
                acc.uses.append(rel.use)  # composed, but not a trained round
            elif rel.use is not None:
                acc.record(rel.server_round, rel.use)
        return acc

    def evaluation_release(self, server_round: int, use: MechanismUse, clip: float, released: str) -> PrivacyRelease:
        """Compose one noisy evaluation (``use``: σ, q = 1, one step) and return its release."""
        self.uses.append(use)
        return PrivacyRelease(
            **self._shared_fields(server_round),
            kind=DP_EVALUATION,
            noise_multiplier=use.noise_multiplier,
            sample_rate=use.sample_rate,
            clip=clip,
            steps=use.steps,
            released=released,
        )
