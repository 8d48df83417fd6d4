"""Distributed DP (privacy.mode = "distributed", SecAgg+) with a silo lost mid-round.

The real-process test runs a TLS SuperLink with SuperNode authentication and 3 SuperNodes on
127.0.0.1 (:class:`deployment.local.LocalDeployment`) and SIGKILLs one SuperNode's process
group at a known point of round 2's secure sum: after it answered ``setup`` and
``share-keys`` (its keys and shares are with the others), when ``collect`` asks for its masked
vector. The point is made deterministic by the silos' test hook
(:data:`client.secagg.TEST_HOOK_ENV`): the silo writes ``hung-…`` and stops answering on that
message, the test then kills it. The same hook saves each silo's staged vector, so the test
can check the released sum is exactly the survivors' sum.
"""

import time
from collections.abc import Callable
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld
from flwr.app import Message
from typer.testing import CliRunner

from cli.main import app as cli_app
from client.app import app as client_app
from client.secagg import TEST_HOOK_ENV
from common.privacy import distributed as dd
from common.privacy.audit import audit_run
from common.privacy.ledger import read_ledger
from common.run_config import load_default_run_config
from common.rundir import RunDir
from common.secagg import vectors, wire
from common.storage import load_arrays
from deployment.launcher import flower_bin
from deployment.local import LocalDeployment
from deployment.processes import processes_using
from server.federation import run_federation
from server.secagg import DROPOUT_EVENT
from tests.fakes import LocalGrid

SILOS = 3
KILLED = 2  # partition id of the silo that is killed
ROUND = 2  # in this round's secure sum
STAGE = "collect"  # on the message asking for its masked vector (setup and share-keys answered)
USERS_PER_ROUND = 30.0
SERVER_LR = 1.0


def distributed_config(run_dir: Path, rounds: int, **extra: object) -> dict:
    """A small distributed-DP run: 150 synthetic users, fixed σ = σ_h = 1, no server momentum."""
    return {
        "num-server-rounds": rounds,
        "run-dir": str(run_dir),
        "privacy.mode": "distributed",
        "strategy.norm-action": "none",  # secure aggregation cannot inspect single updates
        "strategy.reject-opposed": False,
        "data.synthetic.num-users": 150,
        "data.synthetic.num-items": 200,
        "data.synthetic.mean-interactions": 15,
        "model.dim": 8,
        "eval.every": rounds,
        "privacy.distributed.users-per-round": USERS_PER_ROUND,
        "privacy.distributed.noise-multiplier": 1.0,  # fixed σ: no PLD calibration
        "privacy.distributed.target-epsilon": 0.0,
        "privacy.distributed.user-steps": 2,
        "privacy.distributed.server-lr": SERVER_LR,
        "privacy.distributed.server-momentum": 0.0,  # the round's step is server-lr × sum / (q·N_total)
        **extra,
    }


def server_events(run_dir: Path) -> list[dict]:
    """The server ledger's events (its hash chain verified)."""
    return read_ledger(RunDir(run_dir).server_ledger, "server").events()


def replay_union_epsilon(releases: list[dict]) -> float:
    """ε at the last release's δ, from the releases' own fields with dp-accounting alone."""
    accountant = pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    for e in releases:
        step: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(e["noise-multiplier"])
        if e["sample-rate"] < 1:
            step = dp_accounting.PoissonSampledDpEvent(e["sample-rate"], step)
        accountant.compose(step)
    return accountant.get_epsilon(releases[-1]["delta"])


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


# ---------------------------------------------------------------- in process (fast)
def test_a_silo_lost_at_collect_is_named_in_the_ledger_before_the_release(tmp_path: Path):
    run_dir = tmp_path / "run"
    cfg = {**load_default_run_config(), **distributed_config(run_dir, 1, **{"state-root": str(tmp_path / "state")})}
    cfg["privacy.distributed.popularity"] = False

    def drop(node: int, msg: Message) -> bool:  # the last node stops answering after share-keys
        if msg.metadata.message_type != wire.MESSAGE_TYPE or node != SILOS:
            return False
        return wire.decode(msg.content, "test")[0] in ("collect", "unmask")

    run_federation(LocalGrid(client_app, cfg, SILOS, drop=drop), cfg)

    events = server_events(run_dir)
    kinds = [e["kind"] for e in events]
    assert kinds == [DROPOUT_EVENT, dd.KIND_TRAINING, "round-commit"]
    dropout = events[0]
    assert dropout["round"] == 1 and dropout["release"] == dd.KIND_TRAINING
    assert dropout["missing"] == [{"node": SILOS, "silo": f"silo-{SILOS - 1}", "stage": "collect"}]
    assert dropout["in-sum"] == [{"node": 1, "silo": "silo-0"}, {"node": 2, "silo": "silo-1"}]
    assert dropout["silos"] == SILOS and dropout["max-dishonest-silos"] == 1
    # 1 missing ≤ T = 1: the full σ, if none of the two silos in the sum has its share known.
    assert dropout["nominal-noise-multiplier"] == dropout["accounted-noise-multiplier"] == 1.0
    assert dropout["noise"].startswith("1 of 3 silos' noise shares missing ≤ T = 1: the sum carries the full σ·C")
    assert "at most 0 of the 2 silos in it" in dropout["noise"]
    assert events[1]["noise-multiplier"] == 1.0
    (record,) = RunDir(run_dir).read_rounds()
    assert (SILOS, "not in the secure sum of distributed-dp-fedavg: lost at collect") in record.rejected
    assert record.train["silos"] == SILOS - 1
    audit = audit_run(run_dir, empirical=False)
    assert not audit.problems
    (server,) = [led for led in audit.ledgers if led.owner == "server"]
    assert server.dropouts == [{"round": 1, "line": 1, "missing": dropout["missing"], "noise": dropout["noise"]}]
    result = CliRunner().invoke(cli_app, ["audit", str(run_dir), "--no-empirical"])
    assert result.exit_code == 0, result.output
    assert "server: secure sum of round 1 (line 1) without silo-2 (node 3) at collect: 1 of 3 silos'" in " ".join(
        result.output.split()
    )
    assert "Secure sum of round 1 (line 1) without silo-2 (node 3) at collect" in (run_dir / "audit.md").read_text()


# ---------------------------------------------------------------- real processes
@pytest.mark.runtime
@pytest.mark.slow
def test_a_supernode_killed_inside_the_secure_sum_leaves_the_survivors_sum_and_the_ledger_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in ("flower-superlink", "flower-supernode", "flwr"):
        flower_bin(name)  # a missing executable fails loudly
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / f"hang-p{KILLED}-r{ROUND}-{STAGE}").touch()
    hung = hook / f"hung-p{KILLED}-r{ROUND}-{STAGE}"
    monkeypatch.setenv(TEST_HOOK_ENV, str(hook))  # the SuperNodes' ClientApps inherit it
    run_dir = tmp_path / "run"
    timeout = 20.0  # the server waits this long for the killed silo's masked vector
    cfg = distributed_config(run_dir, 2, **{"strategy.timeout": timeout, "privacy.distributed.popularity": False})

    with LocalDeployment(run_dir, SILOS) as dep:
        app = dep.start_app(cfg)
        wait_for(lambda: hung.exists() or app.proc.poll() is not None, 300, f"silo {KILLED} reaching {STAGE}")
        assert hung.exists(), "".join(app.lines)[-3000:]
        killed_node = int(hung.read_text())
        dep.kill_supernode(KILLED)  # SIGKILL: SuperNode, ClientApp host and worker; no goodbye
        killed_at = time.monotonic()
        assert app.wait(300) == 0, "".join(app.lines)[-3000:]
        waited = time.monotonic() - killed_at
        output = "".join(app.lines)
        node_ids = dep.node_ids
        addresses = [dep.address, *(n.runtime_address for n in dep.supernodes.values())]
    # Every process we started is gone (SuperLink, ServerApp, SuperNodes, ClientApp hosts, workers).
    assert [pid for a in addresses for pid in processes_using(a)] == []
    assert "fedrec round 2/2" in output, output[-3000:]
    assert waited < 4 * timeout  # collect and the final evaluation each wait at most `timeout` for it

    # The round record names the killed node and the stage; the others made the round.
    rounds = RunDir(run_dir).read_rounds()
    assert [r.server_round for r in rounds] == [1, 2]
    assert rounds[0].train["silos"] == SILOS and rounds[0].rejected == ()
    second = rounds[1]
    assert second.train["silos"] == SILOS - 1
    assert (killed_node, f"not in the secure sum of {dd.KIND_TRAINING}: lost at {STAGE}") in second.rejected
    assert killed_node == node_ids[KILLED]
    assert second.central is not None and second.central.noise_multiplier == 1.0  # 1 ≤ T missing: σ kept

    # The ledger: the dropout, before round 2's release; both replay with dp-accounting alone.
    events = server_events(run_dir)
    assert [e["kind"] for e in events if e["kind"] != "round-commit"] == [
        dd.KIND_TRAINING, DROPOUT_EVENT, dd.KIND_TRAINING,
    ]  # fmt: skip
    (dropout,) = [e for e in events if e["kind"] == DROPOUT_EVENT]
    assert dropout["round"] == ROUND and dropout["release"] == dd.KIND_TRAINING
    assert dropout["missing"] == [{"node": killed_node, "silo": f"silo-{KILLED}", "stage": STAGE}]
    survivors = {node_ids[i]: f"silo-{i}" for i in range(SILOS) if i != KILLED}
    assert dropout["in-sum"] == [{"node": n, "silo": s} for n, s in sorted(survivors.items())]
    assert dropout["accounted-noise-multiplier"] == 1.0 and "the full σ·C" in dropout["noise"]
    releases = [e for e in events if e["kind"].startswith("distributed-dp")]
    assert all(e["noise-multiplier"] == 1.0 and e["population"] == 150 for e in releases)
    assert replay_union_epsilon(releases) == pytest.approx(releases[-1]["epsilon"], abs=0.01)
    assert rounds[-1].central.epsilon == pytest.approx(releases[-1]["epsilon"])
    assert not audit_run(run_dir, empirical=False).problems

    # The released sum is the survivors' staged vectors', not all three's: undo the server step.
    before, after = (load_arrays(RunDir(run_dir).checkpoint(r)) for r in (1, 2))
    step = vectors.flatten({k: a.numpy() for k, a in after.items()}) - vectors.flatten(
        {k: a.numpy() for k, a in before.items()}
    )
    released = step / SERVER_LR * USERS_PER_ROUND  # sum = (q·N_total) · mean, q·N_total = users per round
    staged = {p: np.load(hook / f"staged-p{p}-r{ROUND}.npy") for p in range(SILOS)}
    survivors_sum = sum(staged[p] for p in range(SILOS) if p != KILLED)
    # Quantisation (< 2·2r/L ≈ 1e-6 here) and float32 checkpoints (~1e-7 × 30) bound the difference.
    assert np.abs(released - survivors_sum).max() < 1e-3
    assert np.abs(released - survivors_sum - staged[KILLED]).max() > 0.1
