"""`fedrec audit` on real (in-process) runs: replay, tamper detection, budgets, canaries."""

import json
import math
import shutil
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from cli.main import app
from common.privacy.accounting import Accountant, MechanismUse, epsilon
from common.privacy.audit import audit_run
from common.privacy.ledger import Chain, encode
from common.round_record import RoundRecord
from common.run_config import load_default_run_config
from common.rundir import RunDir
from simulations.inprocess import run_inprocess

SIGMA = 1.2


def _config(run_dir: Path, **extra) -> dict:
    cfg = load_default_run_config()
    cfg.update(
        {
            "num-server-rounds": 3,
            "run-dir": str(run_dir),
            "data.synthetic.num-users": 300,
            "data.synthetic.num-items": 300,
            "data.synthetic.mean-interactions": 20,
            "model.dim": 16,
            "eval.full-ranking-k": 20,
            "privacy.mode": "local",
            "privacy.local.noise-multiplier": SIGMA,
            "privacy.local.target-epsilon": 0.0,
            "privacy.local.batch-size": 20,
            **extra,
        }
    )
    return cfg


def _run(run_dir: Path, **extra) -> Path:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    run_inprocess(_config(run_dir, **extra), num_nodes=3)
    return run_dir


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("audit") / "run")


@pytest.fixture
def run_copy(clean_run, tmp_path) -> Path:
    return Path(shutil.copytree(clean_run, tmp_path / "copy"))


def _categories(result) -> set[str]:
    return {p.category for p in result.problems}


def test_replay_equals_the_training_time_accountant(clean_run):
    result = audit_run(clean_run)
    assert not result.problems, [str(p) for p in result.problems]
    rounds = RunDir(clean_run).read_rounds()
    silos = [led for led in result.ledgers if led.owner.startswith("silo-")]
    assert len(silos) == 3
    for led in silos:
        claimed = [next(e.epsilon for e in r.privacy if e.owner == led.owner) for r in rounds]
        assert [t.pld for t in led.trajectory] == pytest.approx(claimed, rel=1e-9)
        (mech,) = led.mechanisms
        use = MechanismUse(SIGMA, mech["sample-rate"], mech["steps"] // 3)
        independent = [epsilon([use] * r, led.delta) for r in (1, 2, 3)]
        assert [t.pld for t in led.trajectory] == pytest.approx(independent, rel=1e-9)
        assert led.final_rdp >= led.final_pld
        assert led.final_prv == pytest.approx(led.final_pld, abs=0.05)
        assert led.no_amplification > led.final_pld


def test_cli_writes_statement_and_plots_and_exits_zero(run_copy):
    res = CliRunner().invoke(app, ["audit", str(run_copy)])
    assert res.exit_code == 0, res.output
    assert "audit passed" in res.output
    statement = (run_copy / "audit.md").read_text()
    for needle in ("Verdict: passed", "Not covered", "neighbouring", "without amplification", "silo-2", "δ ="):
        assert needle in statement
    assert (run_copy / "audit-epsilon-rounds.png").stat().st_size > 1000
    assert (run_copy / "audit-epsilon-delta.png").stat().st_size > 1000
    assert json.loads((run_copy / "audit.json").read_text())["ok"] is True


def _edit_line(path: Path, index: int, **changes) -> None:
    lines = path.read_text().splitlines()
    event = json.loads(lines[index])
    event.update(changes)
    lines[index] = encode(event)
    path.write_text("".join(f"{x}\n" for x in lines))


def test_edited_silo_line_is_named(run_copy):
    _edit_line(run_copy / "ledger" / "silo-1.jsonl", 0, **{"noise-multiplier": 9.0})
    result = audit_run(run_copy)
    assert result.exit_code == 3
    assert any(p.ledger == "silo-1" and p.line == 2 and "line 1 was edited" in p.message for p in result.problems)


def test_edited_last_silo_line_is_caught_by_the_server_commit(run_copy):
    _edit_line(run_copy / "ledger" / "silo-2.jsonl", 2, epsilon=0.01)
    result = audit_run(run_copy)
    assert any(p.ledger == "silo-2" and p.line == 3 and "committed" in p.message for p in result.problems)
    assert result.exit_code == 3


def test_deleted_last_silo_line_is_caught_by_the_server_commit(run_copy):
    path = run_copy / "ledger" / "silo-0.jsonl"
    path.write_text("".join(f"{x}\n" for x in path.read_text().splitlines()[:-1]))
    result = audit_run(run_copy)
    assert any(p.ledger == "silo-0" and "deleted" in p.message for p in result.problems)
    assert result.exit_code == 3


def test_reordered_silo_lines_are_named(run_copy):
    path = run_copy / "ledger" / "silo-0.jsonl"
    lines = path.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    path.write_text("".join(f"{x}\n" for x in lines))
    result = audit_run(run_copy)
    assert any(p.ledger == "silo-0" and p.line == 1 for p in result.problems)


def test_edited_or_truncated_server_ledger_end_is_caught_by_state_json(run_copy):
    path = run_copy / "ledger" / "server.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("".join(f"{x}\n" for x in lines[:-1]))
    result = audit_run(run_copy)
    assert any(p.ledger == "server" and "state.json" in p.message for p in result.problems)
    assert result.exit_code == 3


def test_claimed_epsilon_that_differs_from_the_replay_is_a_mismatch(run_copy):
    path = run_copy / "metrics.jsonl"
    rounds = [json.loads(x) for x in path.read_text().splitlines()]
    rounds[1]["privacy"][0]["epsilon"] *= 0.5
    pid = int(rounds[1]["privacy"][0]["owner"].removeprefix("silo-"))
    path.write_text("".join(json.dumps(r) + "\n" for r in rounds))
    result = audit_run(run_copy)
    assert result.exit_code == 4
    (problem,) = result.problems
    assert problem.ledger == f"silo-{pid}" and problem.round == 2 and "metrics.jsonl claims" in problem.message
    res = CliRunner().invoke(app, ["audit", str(run_copy)])
    assert res.exit_code == 4 and f"silo-{pid}, round 2" in res.output


def test_budget_overrun_is_flagged_with_silo_round_and_line(tmp_path):
    # A consistent, well-chained run directory whose silo kept training past its budget.
    run = tmp_path / "run"
    (run / "ledger").mkdir(parents=True)
    use, delta = MechanismUse(1.0, 0.1, 50), 1e-5
    budget = (epsilon([use], delta) + epsilon([use] * 2, delta)) / 2
    silo, server, rounds = Chain("silo-0"), Chain("server"), []
    acc = Accountant("silo-0", "user", 1000, 0.1, 50, 1.0, 1.0, delta, "configured", "pld", budget, "shared model")
    for r in (1, 2):
        acc.record(r, use)  # round 2 goes past the budget: what a broken silo would do
        release = acc.release(r)
        silo.append_release(release)
        server.append("round-commit", r, silos={"0": {"lines": len(silo), "head": silo.head}})
        rounds.append(RoundRecord(r, 1.0, {}, {}, 0, 0, (), (), privacy=(release,)).to_json())
    (run / "ledger" / "silo-0.jsonl").write_text("".join(f"{x}\n" for x in silo.lines))
    (run / "ledger" / "server.jsonl").write_text("".join(f"{x}\n" for x in server.lines))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (run / "config.json").write_text(json.dumps({"run-config": {"privacy.mode": "local"}, "run-uid": "synthetic"}))
    (run / "state.json").write_text(json.dumps({"ledger": {"server-lines": 2, "server-head": server.head}}))
    result = audit_run(run)
    (problem,) = result.problems
    assert (problem.category, problem.ledger, problem.round, problem.line) == ("overrun", "silo-0", 2, 2)
    assert result.exit_code == 5


def test_not_a_run_directory_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["audit", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "not a directory" in res.output


@pytest.mark.slow
def test_empirical_audit_flags_a_run_without_noise_and_passes_the_correct_one(tmp_path):
    # Same settings; the broken run trains without noise while its ledger claims σ = 2.5.
    settings = {"audit.canaries": 1000, "privacy.local.batch-size": 64, "privacy.local.delta": 1e-5, "privacy.local.noise-multiplier": 2.5}
    broken = audit_run(_run(tmp_path / "broken", **settings, **{"audit.unsafe-disable-noise": True}))
    correct = audit_run(_run(tmp_path / "correct", **settings))
    b, c = broken.empirical["one-run"], correct.empirical["one-run"]
    assert b["claimed-epsilon"] == pytest.approx(c["claimed-epsilon"])  # the same claim
    assert b["epsilon_lb"] > b["claimed-epsilon"] + 1.0
    assert broken.exit_code == 6 and _categories(broken) == {"empirical"}
    assert c["epsilon_lb"] <= c["claimed-epsilon"] and not correct.problems
    assert not math.isnan(c["claimed-epsilon"])


def test_central_canary_clients_give_a_one_shot_estimate_that_sees_missing_noise(tmp_path):
    settings = {
        "privacy.mode": "central", "audit.central-canaries": 500,
        "privacy.central.noise-multiplier": 1.0, "privacy.central.delta": 1e-5,
        "privacy.central.target-epsilon": 0.0,
    }
    correct = audit_run(_run(tmp_path / "ok", **settings))
    broken = audit_run(_run(tmp_path / "broken", **settings, **{"audit.unsafe-disable-noise": True}))
    ok, bad = correct.empirical["one-shot"], broken.empirical["one-shot"]
    claimed = ok["claimed-epsilon"]  # z = 1, q = 1, 3 rounds: a Gaussian with z/√3
    assert claimed == pytest.approx(epsilon([MechanismUse(1.0, 1.0, 3)], 1e-5))
    assert claimed / 1.5 < ok["epsilon"] < claimed * 1.5
    assert bad["epsilon"] > 2 * claimed


def test_a_weak_delta_is_warned_about_by_the_audit(tmp_path):
    """δ between 1/(10N) and 1/N: the run is accepted, the audit passes with a warning."""
    run = _run(tmp_path / "weak", **{"num-server-rounds": 1, "privacy.local.delta": 0.0025})  # N = 100 per silo
    result = audit_run(run, empirical=False)
    assert not result.problems, [str(p) for p in result.problems]
    weak = [w for w in result.warnings if "above 1/(10N)" in w]
    assert len(weak) == 3 and "N = 100" in weak[0] and "N·δ = 0.25" in weak[0]
