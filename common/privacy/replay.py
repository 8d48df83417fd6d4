"""Replay one ledger: recompute every ε with the accountant of record and cross-checks.

Each verified chain's releases are composed again by a fresh
:class:`~common.privacy.accounting.Accountant` (PLD, the ε of record), and by RDP,
Opacus' PRV accountant, without amplification by sampling, and as an ε(δ) curve;
each replayed ε is compared with the one the event and ``metrics.jsonl`` claim.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from common.privacy.accounting import Accountant, epsilon, epsilon_delta_curve, merged
from common.privacy.events import RELEASE_KINDS, MechanismUse, PrivacyRelease, ReleaseError, mechanism_of
from common.privacy.ledger import Chain
from common.secagg import ABORT_EVENT, DROPOUT_EVENT

# Replayed ε must equal the claimed ε to this precision (same accountant, same events).
EPS_TOLERANCE = 1e-6
DELTA_GRID = tuple(float(10.0**e) for e in np.arange(-12, -1.75, 0.25))


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding that makes the audit fail."""

    category: str  # chain | mismatch | overrun | empirical
    ledger: str
    round: int | None
    line: int | None
    message: str

    def __str__(self) -> str:
        where = [self.ledger]
        if self.round is not None:
            where.append(f"round {self.round}")
        if self.line is not None:
            where.append(f"line {self.line}")
        return f"[{self.category}] {', '.join(where)}: {self.message}"


@dataclass(slots=True)
class RoundEpsilon:
    """ε after one mechanism event, as claimed and as replayed."""

    round: int
    line: int
    claimed: float
    pld: float
    rdp: float
    steps: int


@dataclass(slots=True)
class LedgerAudit:
    """Everything recomputed for one ledger (a silo's or the server's)."""

    owner: str
    path: str
    lines: int
    unit: str | None = None
    neighbouring: str | None = None
    delta: float | None = None
    delta_rule: str | None = None
    accountant: str | None = None
    target_epsilon: float | None = None
    population: int | None = None
    mechanisms: list[dict[str, Any]] = field(default_factory=list)  # distinct (σ, q, C)
    trajectory: list[RoundEpsilon] = field(default_factory=list)
    declines: list[dict[str, Any]] = field(default_factory=list)
    dropouts: list[dict[str, Any]] = field(default_factory=list)  # secure sums that missed silos (distributed DP)
    final_pld: float = 0.0
    final_rdp: float = 0.0
    final_prv: float | None = None
    prv_note: str = ""
    no_amplification: float = 0.0
    epsilon_delta_curve: list[tuple[float, float]] = field(default_factory=list)
    total_steps: int = 0


def dropout_text(dropout: Mapping[str, Any], *, capital: bool = False) -> str:
    """One line for a :data:`~common.secagg.DROPOUT_EVENT` (or :data:`~common.secagg.ABORT_EVENT`) of
    :attr:`LedgerAudit.dropouts`."""
    if dropout.get("aborted"):
        accounted = dropout.get("accounted-line")
        outcome = (
            "nothing released, no ε spent" if accounted is None else
            f"nothing revealed, but its release (line {accounted}) was accounted before the unmasking: "
            "its ε stays counted"
        )  # fmt: skip
        return (
            f"{'S' if capital else 's'}ecure sum of round {dropout['round']} (line {dropout['line']}) for "
            f"{dropout['release']} aborted: {dropout['reason']}; {outcome}"
        )
    missing = ", ".join(f"{m.get('silo', 'node')} (node {m.get('node')}) at {m.get('stage')}"
                        for m in dropout["missing"])  # fmt: skip
    return (
        f"{'S' if capital else 's'}ecure sum of round {dropout['round']} (line {dropout['line']}) without {missing}: "
        f"{dropout['noise']}"
    )


# ---------------------------------------------------------------- replay
def replay(
    chain: Chain, path: Path, problems: list[Problem], run_claims: Mapping[int, float], claims_source: str
) -> LedgerAudit:
    """Replay one verified chain's releases with a fresh :class:`Accountant`."""
    audit = LedgerAudit(owner=chain.owner, path=str(path), lines=len(chain))
    acc: Accountant | None = None
    mechanisms: dict[tuple[float, float, float], dict[str, Any]] = {}
    round_end: dict[int, tuple[int, float]] = {}
    release_lines: dict[tuple[int, str], int] = {}  # (round, kind) -> line of its release
    for entry in chain.entries:
        if entry.event["kind"] == DROPOUT_EVENT:
            event = entry.event
            audit.dropouts.append({"round": event["round"], "line": entry.seq + 1, "missing": event.get("missing", []),
                                   "noise": event.get("noise", "")})  # fmt: skip
        if entry.event["kind"] == ABORT_EVENT:
            event = entry.event
            kind = str(event.get("release", "?"))
            audit.dropouts.append({"round": event["round"], "line": entry.seq + 1, "aborted": True,
                                   "release": kind, "reason": event.get("reason", ""),
                                   # write-ahead: a sum that failed at unmask was accounted before it
                                   "accounted-line": release_lines.get((int(event["round"]), kind))})  # fmt: skip
        if entry.event["kind"] not in RELEASE_KINDS:
            continue
        rnd, line = int(entry.event["round"]), entry.seq + 1
        release_lines[(rnd, str(entry.event["kind"]))] = line
        try:
            rel = PrivacyRelease.from_json(entry.event)
        except ReleaseError as exc:
            problems.append(Problem("mismatch", chain.owner, rnd, line, f"not a valid privacy release: {exc}"))
            continue
        if acc is None:
            acc = Accountant.from_releases([rel], steps_per_round=rel.steps)
            acc.rounds, acc.uses = [], []
            audit.unit, audit.neighbouring, audit.delta = rel.unit, rel.neighbouring, rel.delta
            audit.delta_rule, audit.accountant, audit.population = rel.delta_rule, rel.accountant, rel.population
            if rel.delta * rel.population >= 1.0:  # allows publishing some unit's data outright
                problems.append(
                    Problem(
                        "overrun",
                        chain.owner,
                        rnd,
                        line,
                        f"δ = {rel.delta:g} is not below 1/N = {1 / rel.population:.3g} for its N = "
                        f"{rel.population} units: no (ε, δ) statement at that δ protects anyone",
                    )
                )
        for key, value, seen in (
            ("unit", rel.unit, acc.unit),
            ("delta", rel.delta, acc.delta),
            ("accountant", rel.accountant, acc.accountant),
        ):
            if value != seen:
                problems.append(
                    Problem(
                        "mismatch",
                        chain.owner,
                        rnd,
                        line,
                        f"{key} changed from {seen!r} to {value!r} within one ledger",
                    )
                )
        audit.target_epsilon = rel.target_epsilon
        use = rel.use
        if use is None:
            replayed = acc.epsilon()
            audit.declines.append(
                {
                    "round": rnd,
                    "line": line,
                    "epsilon": replayed,
                    "epsilon-if-trained": rel.epsilon_if_trained,
                    "target-epsilon": rel.target_epsilon,
                }
            )
            _compare(problems, chain.owner, rnd, line, "the decline event", rel.epsilon, replayed)
            continue
        acc.record(rnd, use)
        mech_key = (use.noise_multiplier, use.sample_rate, rel.clip)
        mech = mechanisms.setdefault(
            mech_key,
            {
                "noise-multiplier": mech_key[0],
                "sample-rate": mech_key[1],
                "clip": mech_key[2],
                "rounds": [],
                "steps": 0,
                "mechanism": mechanism_of(mech_key[1])[0],
                "sampling": mechanism_of(mech_key[1])[1],
            },
        )
        mech["rounds"].append(rnd)
        mech["steps"] += use.steps
        replayed = acc.epsilon()
        point = RoundEpsilon(
            round=rnd,
            line=line,
            claimed=rel.epsilon,
            pld=acc.epsilon("pld"),
            rdp=acc.epsilon("rdp"),
            steps=sum(u.steps for u in acc.uses),
        )
        audit.trajectory.append(point)
        _compare(problems, chain.owner, rnd, line, "the event", point.claimed, replayed)
        round_end[rnd] = (line, replayed)  # a round may release twice (training, noisy evaluation)
        if rel.target_epsilon > 0 and replayed > rel.target_epsilon * (1 + EPS_TOLERANCE):
            problems.append(
                Problem(
                    "overrun", chain.owner, rnd, line, f"ε={replayed:.6g} exceeds the budget {rel.target_epsilon:g}"
                )
            )
    for rnd, (line, replayed) in round_end.items():
        if rnd in run_claims:  # metrics.jsonl holds each owner's ε after its round's last release
            _compare(problems, chain.owner, rnd, line, claims_source, run_claims[rnd], replayed)
    audit.mechanisms = list(mechanisms.values())
    if acc is not None and acc.uses:
        uses = acc.uses
        audit.total_steps = sum(u.steps for u in uses)
        audit.final_pld = acc.epsilon("pld")
        audit.final_rdp = acc.epsilon("rdp")
        audit.final_prv, audit.prv_note = _prv(uses, acc.delta)
        audit.no_amplification = epsilon(
            [MechanismUse(u.noise_multiplier, 1.0, u.steps) for u in uses], acc.delta, "pld"
        )
        audit.epsilon_delta_curve = epsilon_delta_curve(uses, DELTA_GRID)
    return audit


def _compare(
    problems: list[Problem], owner: str, rnd: int, line: int, source: str, claimed: float, replayed: float
) -> None:
    if math.isinf(claimed) and math.isinf(replayed):
        return
    if not math.isclose(claimed, replayed, rel_tol=EPS_TOLERANCE, abs_tol=EPS_TOLERANCE):
        problems.append(
            Problem(
                "mismatch",
                owner,
                rnd,
                line,
                f"{source} claims ε={claimed:.6g}; replaying the ledger gives ε={replayed:.6g}",
            )
        )


def _prv(uses: list[MechanismUse], delta: float) -> tuple[float | None, str]:
    """Opacus' PRV accountant over the same steps (an independent implementation)."""
    return _prv_cached(tuple(merged(uses)), delta)


@lru_cache(maxsize=256)
def _prv_cached(uses: tuple[MechanismUse, ...], delta: float) -> tuple[float | None, str]:
    try:
        from opacus.accountants import PRVAccountant
    except ImportError:
        return None, "opacus not installed"
    acc = PRVAccountant()
    acc.history = [(u.noise_multiplier, u.sample_rate, u.steps) for u in uses if u.steps]
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # log(0) at q = 1 is harmless there
            return float(acc.get_epsilon(delta=delta, eps_error=0.01)), "opacus PRVAccountant, eps_error 0.01"
    except Exception as exc:  # noqa: BLE001 - PRV's numerical limits (e.g. tiny σ) are reported, not fatal
        return None, f"PRV failed: {exc}"
