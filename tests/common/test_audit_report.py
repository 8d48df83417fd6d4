"""audit.md from hand-written ledgers and audit results: statement first, identical ledgers collapsed."""

from __future__ import annotations

import json
from pathlib import Path

from common.privacy.audit import AuditResult
from common.privacy.audit_report import render_statement
from common.privacy.events import PrivacyRelease
from common.privacy.ledger import Chain
from common.privacy.replay import LedgerAudit, Problem, RoundEpsilon
from common.privacy.statement import silo_sentence
from common.rundir import RunDir


def _release(owner: str, round_: int, epsilon: float, population: int) -> PrivacyRelease:
    return PrivacyRelease(
        owner=owner, server_round=round_, kind="dp-sgd", unit="user", accountant="pld", delta=1e-5,
        delta_rule="min(1e-5, 1/(10N)) for the silo's N users", epsilon=epsilon, target_epsilon=8.0,
        noise_multiplier=1.2, sample_rate=0.17, clip=1.0, population=population, steps=6, total_steps=6 * round_,
        rounds_trained=round_, released="shared model parameters after the round (item tables, score function)",
    )


def _ledger_audit(owner: str, population: int) -> LedgerAudit:
    return LedgerAudit(
        owner=owner, path=f"ledger/{owner}.jsonl", lines=2, unit="user",
        neighbouring="replace one user's interactions (in one silo) with none", delta=1e-5,
        delta_rule="min(1e-5, 1/(10N)) for the silo's N users", accountant="pld", target_epsilon=8.0,
        population=population,
        mechanisms=[{"mechanism": "poisson-subsampled-gaussian", "sampling": "poisson", "noise-multiplier": 1.2,
                     "sample-rate": 0.17, "clip": 1.0, "rounds": [1, 2], "steps": 12}],
        trajectory=[RoundEpsilon(1, 1, 0.5, 0.5, 0.6, 6), RoundEpsilon(2, 2, 1.0, 1.0, 1.2, 12)],
        final_pld=1.0, final_rdp=1.2, final_prv=1.01, no_amplification=40.0, total_steps=12,
    )


def _run(tmp_path: Path, populations: dict[int, int]) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.ledger_dir.mkdir(parents=True)
    for pid, n in populations.items():
        chain = Chain(f"silo-{pid}")
        for r in (1, 2):
            chain.append_release(_release(f"silo-{pid}", r, 0.5 * r, n))
        run.silo_ledger(pid).write_text("".join(f"{line}\n" for line in chain.lines))
    return run


def _result(run: RunDir, populations: dict[int, int], **extra) -> AuditResult:
    ledgers = [_ledger_audit(f"silo-{pid}", n) for pid, n in populations.items()]
    config = {"privacy.mode": "local", "privacy.noise-generator": "os-seeded", **extra.pop("config", {})}
    return AuditResult(str(run.path), ledgers, extra.pop("problems", []), [], extra.pop("empirical", None), config)


POPULATIONS = {0: 189, 1: 189, 2: 188}


def test_audit_md_opens_with_one_sentence_per_silo_from_its_ledger(tmp_path):
    run = _run(tmp_path, POPULATIONS)
    text = render_statement(_result(run, POPULATIONS))
    lines = text.splitlines()
    assert lines[2] == "## Privacy statement"
    first = [_release("silo-0", r, 0.5 * r, 189) for r in (1, 2)]
    assert lines[4] == "- " + silo_sentence(first)
    assert lines[6].startswith("- silo 2: user-level (ε = 1.00, δ = 1e-5)") and "its 188 users" in lines[6]
    assert lines[8].startswith("**Verdict: passed.**")
    assert "training losses and evaluation metrics the silos report (not noised)" not in text
    assert "**Not covered** by any ε" in text and "not a cryptographic generator" in text


def test_identical_silo_ledgers_share_one_section_and_one_summary_row(tmp_path):
    run = _run(tmp_path, POPULATIONS)
    text = render_statement(_result(run, POPULATIONS))
    assert "### `silo-0`, `silo-1`: 2 identical ledgers (2 lines each)" in text
    assert "### `silo-2` (2 ledger lines)" in text
    assert text.count("| round | line | claimed ε |") == 2
    assert "| `silo-0`, `silo-1` | user | 189 | 1e-05 | 1.2 | 0.17 | 1 | 12 | 1.000 | 1.200 | 1.010 | 8 |" in text
    assert "| `silo-2` | user | 188 |" in text


def test_audit_md_says_the_empirical_audit_did_not_run_and_how_to_run_it(tmp_path):
    run = _run(tmp_path, {0: 189})
    text = render_statement(_result(run, {0: 189}))
    section = text.split("## Empirical audit", 1)[1].split("##", 1)[0]
    assert "**Not run:** this run trained no canaries" in section
    assert "-c audit.canaries=1000" in section and "fedrec audit RUN_DIR" in section
    assert "audit.central-canaries" not in section  # a local-DP run: only the local recipe
    skipped = render_statement(_result(run, {0: 189}, config={"audit.canaries": 500}))
    assert "although this run trained canaries (`audit.canaries` = 500" in skipped
    assert "--no-empirical" in skipped


def test_a_failed_audit_still_states_what_the_ledgers_claim_and_names_an_unreadable_ledger(tmp_path):
    run = _run(tmp_path, {0: 189})
    run.silo_ledger(1).write_text(json.dumps({"format": "x"}) + "\n")
    problem = Problem("chain", "silo-1", None, 1, "format is 'x'")
    text = render_statement(_result(run, {0: 189}, problems=[problem]))
    assert "- silo 1: its ledger does not verify (line 1: " in text
    assert "**Verdict: FAILED** (exit code 3)" in text
