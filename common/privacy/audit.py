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

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.errors import FedrecError
from common.privacy.audit_canaries import empirical_audit
from common.privacy.events import SERVER_OWNER, partition_of, silo_owner
from common.privacy.ledger import Chain, LedgerError, read_ledger
from common.privacy.replay import LedgerAudit, Problem, replay
from common.round_record import RoundRecord
from common.rundir import RunDir, RunDirError, RunState

# PRV and PLD are both tight; a larger gap is reported as a warning.
PRV_WARN_GAP = 0.05

# Exit codes of `fedrec audit`, by severity (the most severe problem wins).
EXIT_CODES = {"chain": 3, "mismatch": 4, "overrun": 5, "empirical": 6}


class AuditInputError(FedrecError):
    """The run directory lacks what an audit needs."""


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
def _load_run(run: RunDir) -> tuple[dict[str, Any], list[RoundRecord], RunState | None]:
    if not run.path.is_dir():
        raise AuditInputError(f"{run.path}: not a directory")
    for path in (run.config, run.metrics, run.state):
        if not path.exists():
            raise AuditInputError(f"{path}: missing ({path.name} is written by every fedrec run)")
    try:
        return run.read_config().run_config, run.read_rounds(), run.read_state()
    except RunDirError as exc:
        raise AuditInputError(str(exc)) from None


# ---------------------------------------------------------------- anchors
def _check_anchors(
    server: Chain | None, silos: dict[int, Chain], state: RunState | None, problems: list[Problem]
) -> None:
    if server is None:
        return
    anchor = None if state is None else state.ledger_anchor
    if anchor is None:
        problems.append(Problem("chain", SERVER_OWNER, None, None, "state.json has no ledger anchor"))
    elif anchor.get("server-lines") != len(server) or anchor.get("server-head") != server.head:
        problems.append(
            Problem(
                "chain",
                "server",
                None,
                len(server),
                f"the ledger has {len(server)} lines ending in {server.head[:12]}…, but state.json anchors "
                f"{anchor.get('server-lines')} lines ending in {str(anchor.get('server-head'))[:12]}…: "
                "lines at the end were edited, deleted or appended",
            )
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
                problems.append(
                    Problem("chain", owner, rnd, None, f"ledger file missing; the server committed {n} lines")
                )
            elif len(chain) < n:
                problems.append(
                    Problem(
                        "chain",
                        owner,
                        rnd,
                        len(chain) + 1,
                        f"ledger has {len(chain)} lines; round {rnd} committed {n}: lines were deleted",
                    )
                )
            elif n and chain.entries[n - 1].hash != held["head"]:
                problems.append(
                    Problem("chain", owner, rnd, n, f"line {n} differs from the one committed in round {rnd}")
                )
    for pid, chain in silos.items():
        committed = int(last_commit.get(str(pid), {}).get("lines", 0))
        if len(chain) > committed:
            problems.append(
                Problem(
                    "chain",
                    silo_owner(pid),
                    None,
                    committed + 1,
                    f"lines {committed + 1}..{len(chain)} are not covered by any round-commit of the server",
                )
            )


# ---------------------------------------------------------------- main entry
def audit_run(run_dir: Path, *, empirical: bool = True) -> AuditResult:
    """Audit one run directory (see the module docstring).

    Raises
    ------
    AuditInputError
        If the directory is not a fedrec run (missing or unreadable files).
    """
    run = RunDir(run_dir)
    run_config, rounds, state = _load_run(run)
    problems: list[Problem] = []
    warnings: list[str] = []
    chains: dict[str, tuple[Chain, Path]] = {}
    silo_chains: dict[int, Chain] = {}
    server_chain: Chain | None = None
    paths = [(SERVER_OWNER, run.server_ledger)] if run.server_ledger.exists() else []
    paths += [(silo_owner(pid), path) for pid, path in run.silo_ledgers()]
    if not paths:
        raise AuditInputError(f"{run.ledger_dir}: no ledgers (runs before the ledger existed cannot be audited)")
    for owner, path in paths:
        try:
            chain = read_ledger(path, owner)
        except LedgerError as exc:
            problems.append(Problem("chain", owner, None, exc.line, exc.reason))
            continue
        chains[owner] = (chain, path)
        pid = partition_of(owner)
        if pid is None:
            server_chain = chain
        else:
            silo_chains[pid] = chain
    if SERVER_OWNER not in chains and not any(p.category == "chain" and p.ledger == SERVER_OWNER for p in problems):
        problems.append(Problem("chain", SERVER_OWNER, None, None, f"{run.server_ledger.name} is missing"))
    _check_anchors(server_chain, silo_chains, state, problems)

    claims_local: dict[int, dict[int, float]] = {}
    claims_central: dict[int, float] = {}
    for r in rounds:
        for e in r.privacy:
            if e.trained and e.partition_id is not None:
                claims_local.setdefault(e.partition_id, {})[r.server_round] = e.epsilon
        if r.central is not None:
            claims_central[r.server_round] = r.central.epsilon
    ledgers = []
    for owner, (chain, path) in sorted(chains.items()):
        pid = partition_of(owner)
        claims = claims_central if pid is None else claims_local.get(pid, {})
        audit = replay(chain, path, problems, claims, run.metrics.name)
        recorded = {t.round for t in audit.trajectory}
        for rnd in sorted(set(claims) - recorded):
            problems.append(
                Problem(
                    "mismatch",
                    owner,
                    rnd,
                    None,
                    f"{run.metrics.name} reports a DP round that the ledger does not record",
                )
            )
        n, delta = audit.population, audit.delta
        if n and delta is not None and 1 / (10 * n) < delta < 1 / n:
            warnings.append(
                f"{owner}: δ = {delta:g} is above 1/(10N) = {1 / (10 * n):.3g} for its N = {n} units: "
                f"weak (N·δ = {n * delta:.3g}); the default is min(1e-5, 1/(10N))"
            )
        if audit.final_prv is not None and abs(audit.final_prv - audit.final_pld) > PRV_WARN_GAP:
            warnings.append(
                f"{owner}: PRV ε {audit.final_prv:.3f} and PLD ε {audit.final_pld:.3f} "
                f"differ by more than {PRV_WARN_GAP}"
            )
        if audit.trajectory or audit.declines or owner != SERVER_OWNER:
            ledgers.append(audit)
    for pid in sorted(set(claims_local) - set(silo_chains)):
        problems.append(
            Problem(
                "mismatch", silo_owner(pid), None, None, f"{run.metrics.name} reports DP rounds but no ledger exists"
            )
        )

    emp = None
    if empirical:
        emp = empirical_audit(run, run_config, ledgers, problems, warnings)
    return AuditResult(str(run_dir), ledgers, problems, warnings, emp, run_config)
