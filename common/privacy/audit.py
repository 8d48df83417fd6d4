"""``fedrec audit``: verify a run's ledgers, recompute every ε, check the empirical audit.

The audit trusts nothing the run printed. From the run directory alone it

1. verifies every ledger's hash chain, the per-round ``round-commit`` anchors of the
   silo ledgers in the server ledger, and the server ledger's head in ``state.json``;
2. replays each ledger's mechanism events with dp-accounting's PLD accountant (the
   ε of record), RDP and Opacus' PRV accountant, with and without amplification by
   sampling, and the ε(δ) curve;
3. compares the replayed ε with the ε each event claimed and with the per-round ε
   in ``metrics.jsonl``, and checks every budget;
4. when the run trained canaries, scores them on the saved models and bounds ε from
   below (one-run audit) or estimates it (one-shot, canary clients).

Problems are collected (never raised), each naming the ledger, round and line.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from dp_accounting import pld, rdp

from common.config import AppConfig
from common.errors import FedrecError
from common.privacy.accounting import PLD_MIN_NOISE, MechanismUse, epsilon, merged
from common.privacy.ledger import Chain, LedgerError, read_ledger, silo_owner

MECHANISM_KINDS = ("dp-sgd", "dp-fedavg")
# Replayed ε must equal the claimed ε to this precision (same accountant, same events).
EPS_TOLERANCE = 1e-6
# PRV and PLD are both tight; a larger gap is reported as a warning.
PRV_WARN_GAP = 0.05
DELTA_GRID = tuple(10.0**e for e in np.arange(-12, -1.75, 0.25))

# Exit codes of `fedrec audit`, by severity (the most severe problem wins).
EXIT_CODES = {"chain": 3, "mismatch": 4, "overrun": 5, "empirical": 6}


class AuditInputError(FedrecError):
    """The run directory lacks what an audit needs."""


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
    final_pld: float = 0.0
    final_rdp: float = 0.0
    final_prv: float | None = None
    prv_note: str = ""
    no_amplification: float = 0.0
    epsilon_delta_curve: list[tuple[float, float]] = field(default_factory=list)
    total_steps: int = 0


@dataclass(slots=True)
class AuditResult:
    """The audit of one run directory."""

    run_dir: str
    ledgers: list[LedgerAudit]
    problems: list[Problem]
    warnings: list[str]
    empirical: dict[str, Any] | None
    config: dict[str, Any]

    @property
    def exit_code(self) -> int:
        """0 when clean, else the code of the most severe problem category."""
        codes = [EXIT_CODES[p.category] for p in self.problems]
        return min(codes) if codes else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``audit.json``)."""
        return {
            "run-dir": self.run_dir,
            "ok": not self.problems,
            "exit-code": self.exit_code,
            "problems": [asdict(p) | {"text": str(p)} for p in self.problems],
            "warnings": self.warnings,
            "ledgers": [asdict(led) for led in self.ledgers],
            "empirical": self.empirical,
        }


# ---------------------------------------------------------------- loading
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AuditInputError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
    return out


def _load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    if not run_dir.is_dir():
        raise AuditInputError(f"{run_dir}: not a directory")
    paths = {name: run_dir / name for name in ("config.json", "metrics.jsonl", "state.json")}
    for name, path in paths.items():
        if not path.exists():
            raise AuditInputError(f"{path}: missing ({name} is written by every fedrec run)")
    try:
        config = json.loads(paths["config.json"].read_text())["run-config"]
        state = json.loads(paths["state.json"].read_text())
    except (json.JSONDecodeError, KeyError) as exc:
        raise AuditInputError(f"{run_dir}: config.json/state.json unreadable ({exc})") from None
    return config, _read_jsonl(paths["metrics.jsonl"]), state


# ---------------------------------------------------------------- replay
def _replay(chain: Chain, path: Path, problems: list[Problem], run_claims: Mapping[int, float]) -> LedgerAudit:
    """Replay one verified chain's mechanism events."""
    audit = LedgerAudit(owner=chain.owner, path=str(path), lines=len(chain))
    uses: list[MechanismUse] = []
    mechanisms: dict[tuple[float, float, float], dict[str, Any]] = {}
    for entry in chain.entries:
        ev = entry.event
        line = entry.seq + 1
        rnd = int(ev["round"])
        if ev["kind"] not in (*MECHANISM_KINDS, "budget-decline"):
            continue
        for key, attr in (("unit", "unit"), ("delta", "delta"), ("accountant", "accountant")):
            value = ev.get(key)
            seen = getattr(audit, attr)
            if seen is None:
                setattr(audit, attr, value)
            elif value != seen:
                problems.append(Problem("mismatch", chain.owner, rnd, line, f"{key} changed from {seen!r} to {value!r} within one ledger"))
        audit.neighbouring = audit.neighbouring or ev.get("neighbouring")
        audit.delta_rule = audit.delta_rule or ev.get("delta-rule")
        audit.target_epsilon = ev.get("target-epsilon", audit.target_epsilon)
        acc_name = str(ev.get("accountant", "pld"))
        delta = float(ev["delta"])
        if ev["kind"] in MECHANISM_KINDS:
            try:
                use = MechanismUse(float(ev["noise-multiplier"]), float(ev["sample-rate"]), int(ev["steps"]))
            except (KeyError, TypeError, ValueError) as exc:
                problems.append(Problem("mismatch", chain.owner, rnd, line, f"mechanism parameters unusable: {exc}"))
                continue
            uses.append(use)
            audit.population = int(ev.get("population", 0)) or audit.population
            key = (use.noise_multiplier, use.sample_rate, float(ev.get("clip", math.nan)))
            mech = mechanisms.setdefault(
                key,
                {"noise-multiplier": key[0], "sample-rate": key[1], "clip": key[2], "rounds": [], "steps": 0,
                 "mechanism": ev.get("mechanism"), "sampling": ev.get("sampling")},
            )
            mech["rounds"].append(rnd)
            mech["steps"] += use.steps
            replayed = epsilon(uses, delta, acc_name)  # type: ignore[arg-type]
            point = RoundEpsilon(
                round=rnd, line=line, claimed=float(ev["epsilon"]),
                pld=epsilon(uses, delta, "pld"), rdp=epsilon(uses, delta, "rdp"),
                steps=sum(u.steps for u in uses),
            )
            audit.trajectory.append(point)
            _compare(problems, chain.owner, rnd, line, "the event", point.claimed, replayed)
            if rnd in run_claims:
                _compare(problems, chain.owner, rnd, line, "metrics.jsonl", run_claims[rnd], replayed)
            target = float(ev.get("target-epsilon") or 0.0)
            if target > 0 and replayed > target * (1 + EPS_TOLERANCE):
                problems.append(Problem("overrun", chain.owner, rnd, line, f"ε={replayed:.6g} exceeds the budget {target:g}"))
        else:
            replayed = epsilon(uses, delta, acc_name)  # type: ignore[arg-type]
            audit.declines.append({"round": rnd, "line": line, "epsilon": replayed, "epsilon-if-trained": ev.get("epsilon-if-trained"), "target-epsilon": ev.get("target-epsilon")})
            _compare(problems, chain.owner, rnd, line, "the decline event", float(ev["epsilon"]), replayed)
    audit.mechanisms = list(mechanisms.values())
    audit.total_steps = sum(u.steps for u in uses)
    if uses and audit.delta is not None:
        delta = float(audit.delta)
        audit.final_pld = epsilon(uses, delta, "pld")
        audit.final_rdp = epsilon(uses, delta, "rdp")
        audit.final_prv, audit.prv_note = _prv(uses, delta)
        audit.no_amplification = epsilon([MechanismUse(u.noise_multiplier, 1.0, u.steps) for u in uses], delta, "pld")
        audit.epsilon_delta_curve = _epsilon_delta_curve(uses)
    return audit


def _compare(problems: list[Problem], owner: str, rnd: int, line: int, source: str, claimed: float, replayed: float) -> None:
    if math.isinf(claimed) and math.isinf(replayed):
        return
    if not math.isclose(claimed, replayed, rel_tol=EPS_TOLERANCE, abs_tol=EPS_TOLERANCE):
        problems.append(
            Problem("mismatch", owner, rnd, line, f"{source} claims ε={claimed:.6g}; replaying the ledger gives ε={replayed:.6g}")
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


def _epsilon_delta_curve(uses: list[MechanismUse]) -> list[tuple[float, float]]:
    """ε at every δ of :data:`DELTA_GRID` from one composed PLD (RDP below PLD's σ range)."""
    return list(_curve_cached(tuple(merged(uses))))


@lru_cache(maxsize=256)
def _curve_cached(parts: tuple[MechanismUse, ...]) -> tuple[tuple[float, float], ...]:
    if any(u.noise_multiplier == 0 for u in parts):
        return tuple((float(d), math.inf) for d in DELTA_GRID)
    name = "pld" if min(u.noise_multiplier for u in parts) >= PLD_MIN_NOISE else "rdp"
    acc = pld.PLDAccountant() if name == "pld" else rdp.RdpAccountant(list(range(2, 64)) + [80, 96, 128, 256, 512, 1024])
    for use in parts:
        acc.compose(use.dp_event())
    return tuple((float(d), float(acc.get_epsilon(float(d)))) for d in DELTA_GRID)


# ---------------------------------------------------------------- anchors
def _check_anchors(
    server: Chain | None, silos: dict[int, Chain], state: Mapping[str, Any], problems: list[Problem]
) -> None:
    if server is None:
        return
    anchor = state.get("ledger")
    if anchor is None:
        problems.append(Problem("chain", "server", None, None, "state.json has no ledger anchor"))
    elif anchor.get("server-lines") != len(server) or anchor.get("server-head") != server.head:
        problems.append(
            Problem("chain", "server", None, len(server),
                    f"the ledger has {len(server)} lines ending in {server.head[:12]}…, but state.json anchors "
                    f"{anchor.get('server-lines')} lines ending in {str(anchor.get('server-head'))[:12]}…: "
                    "lines at the end were edited, deleted or appended")
        )
    last_commit: dict[str, Any] = {}
    for entry in server.entries:
        if entry.event["kind"] != "round-commit":
            continue
        rnd = int(entry.event["round"])
        last_commit = entry.event.get("silos", {})
        for pid_text, held in last_commit.items():
            owner = silo_owner(int(pid_text))
            chain = silos.get(int(pid_text))
            n = int(held["lines"])
            if chain is None:
                problems.append(Problem("chain", owner, rnd, None, f"ledger file missing; the server committed {n} lines"))
            elif len(chain) < n:
                problems.append(Problem("chain", owner, rnd, len(chain) + 1, f"ledger has {len(chain)} lines; round {rnd} committed {n}: lines were deleted"))
            elif n and chain.entries[n - 1].hash != held["head"]:
                problems.append(Problem("chain", owner, rnd, n, f"line {n} differs from the one committed in round {rnd}"))
    for pid, chain in silos.items():
        committed = int(last_commit.get(str(pid), {}).get("lines", 0))
        if len(chain) > committed:
            problems.append(
                Problem("chain", silo_owner(pid), None, committed + 1,
                        f"lines {committed + 1}..{len(chain)} are not covered by any round-commit of the server")
            )


# ---------------------------------------------------------------- main entry
def audit_run(run_dir: Path, *, empirical: bool = True) -> AuditResult:
    """Audit one run directory (see the module docstring).

    Raises
    ------
    AuditInputError
        If the directory is not a fedrec run (missing or unreadable files).
    """
    run_config, rounds, state = _load_run(run_dir)
    problems: list[Problem] = []
    warnings: list[str] = []
    ledger_dir = run_dir / "ledger"
    chains: dict[str, tuple[Chain, Path]] = {}
    silo_chains: dict[int, Chain] = {}
    server_chain: Chain | None = None
    paths = sorted(ledger_dir.glob("*.jsonl")) if ledger_dir.is_dir() else []
    if not paths:
        raise AuditInputError(f"{ledger_dir}: no ledgers (runs before the ledger existed cannot be audited)")
    for path in paths:
        owner = path.stem
        try:
            chain = read_ledger(path, owner)
        except LedgerError as exc:
            problems.append(Problem("chain", owner, None, exc.line, exc.reason))
            continue
        chains[owner] = (chain, path)
        if owner == "server":
            server_chain = chain
        elif owner.startswith("silo-") and owner[5:].isdigit():
            silo_chains[int(owner[5:])] = chain
    if "server" not in chains and not any(p.category == "chain" and p.ledger == "server" for p in problems):
        problems.append(Problem("chain", "server", None, None, "server.jsonl is missing"))
    _check_anchors(server_chain, silo_chains, state, problems)

    claims_local: dict[int, dict[int, float]] = {}
    claims_central: dict[int, float] = {}
    for r in rounds:
        for e in r.get("privacy", []):
            if e.get("trained"):
                claims_local.setdefault(int(e["partition-id"]), {})[int(r["round"])] = float(e["epsilon"])
        if r.get("central-privacy"):
            claims_central[int(r["round"])] = float(r["central-privacy"]["epsilon"])
    ledgers = []
    for owner, (chain, path) in sorted(chains.items()):
        claims = claims_central if owner == "server" else claims_local.get(int(owner[5:]), {})
        audit = _replay(chain, path, problems, claims)
        recorded = {t.round for t in audit.trajectory}
        for rnd in sorted(set(claims) - recorded):
            problems.append(Problem("mismatch", owner, rnd, None, "metrics.jsonl reports a DP round that the ledger does not record"))
        if audit.final_prv is not None and abs(audit.final_prv - audit.final_pld) > PRV_WARN_GAP:
            warnings.append(f"{owner}: PRV ε {audit.final_prv:.3f} and PLD ε {audit.final_pld:.3f} differ by more than {PRV_WARN_GAP}")
        if audit.trajectory or audit.declines or owner != "server":
            ledgers.append(audit)
    for pid in sorted(set(claims_local) - set(silo_chains)):
        problems.append(Problem("mismatch", silo_owner(pid), None, None, "metrics.jsonl reports DP rounds but no ledger exists"))

    emp = None
    if empirical:
        emp = _empirical(run_dir, run_config, ledgers, problems, warnings)
    return AuditResult(str(run_dir), ledgers, problems, warnings, emp, run_config)


def _empirical(
    run_dir: Path, run_config: dict[str, Any], ledgers: list[LedgerAudit], problems: list[Problem], warnings: list[str]
) -> dict[str, Any] | None:
    try:
        cfg = AppConfig.from_run_config(run_config)
    except FedrecError as exc:
        warnings.append(f"config.json does not parse with this fedrec version ({exc}); empirical audit skipped")
        return None
    if not (cfg.audit.canaries or cfg.audit.central_canaries):
        return None
    from common.privacy import canaries, one_run, one_shot
    from common.storage import load_arrays

    initial_path, final_path = run_dir / "initial.npz", run_dir / "final.npz"
    for path in (initial_path, final_path):
        if not path.exists():
            problems.append(Problem("empirical", "server", None, None, f"{path.name} missing: canaries cannot be scored"))
            return None
    initial = {k: v.numpy() for k, v in load_arrays(initial_path).items()}
    final = {k: v.numpy() for k, v in load_arrays(final_path).items()}
    out: dict[str, Any] = {}
    if cfg.audit.canaries:
        owner = silo_owner(cfg.audit.canary_silo)
        audited = next((led for led in ledgers if led.owner == owner), None)
        from common.models import build_model

        model = build_model(cfg.model.name, 1, 2, cfg.model.dim, cfg.model.mlp_layers)
        item_tables = tuple(model.item_tables)
        num_items = final[f"{item_tables[0]}.weight"].shape[0]
        plan = canaries.canary_plan(cfg.audit, num_items - cfg.audit.canaries)
        scores = canaries.canary_scores(initial, final, item_tables, plan)
        delta = float(audited.delta) if audited and audited.delta is not None else 1e-5
        if 2 * plan.count * delta > 0.05:
            warnings.append(
                f"{owner}: δ={delta:.3g} is too large for a one-run audit with {plan.count} canaries "
                f"(2·m·δ = {2 * plan.count * delta:.3g} > 0.05): the lower bound stays near 0 whatever "
                "the model leaks; claim ε at δ ≤ 0.025/m (privacy.local.delta) to audit it"
            )
        result = one_run.one_run_audit(scores, plan.included, delta)
        claimed = audited.final_pld if audited else math.nan
        out["one-run"] = {
            "silo": cfg.audit.canary_silo,
            "unit": "user (each canary is one user with one interaction)",
            "canaries": plan.count,
            "included": int(plan.included.sum()),
            "claimed-epsilon": claimed,
            "delta": delta,
            "unsafe-disable-noise": cfg.audit.unsafe_disable_noise,
            **result.to_dict(),
        }
        if result.epsilon_lb > claimed:
            problems.append(
                Problem("empirical", owner, None, None,
                        f"one-run audit lower bound ε_LB={result.epsilon_lb:.3f} (95% confidence) exceeds the claimed "
                        f"ε={claimed:.3f}: the model leaks more than the ledger says (is the noise really added?)")
            )
    if cfg.audit.central_canaries and (run_dir / "central-canaries.json").exists():
        data = json.loads((run_dir / "central-canaries.json").read_text())
        server = next((led for led in ledgers if led.owner == "server"), None)
        delta = float(server.delta) if server and server.delta is not None else 1e-5
        est = one_shot.one_shot_epsilon(np.array(data["cosines"]), int(data["dim"]), delta)
        claimed = server.final_pld if server else math.nan
        out["one-shot"] = {"claimed-epsilon": claimed, **est.to_dict()}
        if est.epsilon > claimed:
            warnings.append(
                f"server: the one-shot estimate ε̂={est.epsilon:.3f} from {est.count} canary clients exceeds "
                f"the claimed client-level ε={claimed:.3f} (an estimate, not a bound: investigate)"
            )
    if cfg.audit.unsafe_disable_noise:
        warnings.append("config sets audit.unsafe-disable-noise: this run trained WITHOUT noise while claiming σ (a deliberate audit demonstration)")
    return out or None
