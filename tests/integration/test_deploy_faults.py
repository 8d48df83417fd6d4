"""Faults on a real deployment (TLS + node auth, 2 SuperNodes): a silo restart, a server kill."""

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from client.durable import fingerprint
from common.privacy.accounting import MechanismUse, epsilon
from common.privacy.audit import audit_run
from common.round_record import RoundRecord
from common.rundir import RunDir
from common.storage import load_arrays
from deployment.launcher import flower_bin
from deployment.local import LocalDeployment

pytestmark = [pytest.mark.runtime, pytest.mark.slow]

CONFIG = {
    "data.synthetic.num-users": 300,
    "data.synthetic.num-items": 300,
    "model.dim": 8,
    "privacy.mode": "local",
    "privacy.local.noise-multiplier": 1.2,
    "privacy.local.target-epsilon": 0.0,
    "privacy.local.batch-size": 20,
    "strategy.timeout": 90.0,  # a silo killed mid-round is missing after 90 s, not an hour
    "eval.every": 10,
}


def _rounds(run_dir: Path) -> list[RoundRecord]:
    return RunDir(run_dir).read_rounds()


def _wait_for_round(run_dir: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(_rounds(run_dir)) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"round {n} not completed within {timeout}s")
        time.sleep(0.2)


def _silo_epsilons(run_dir: Path, pid: int) -> list[float]:
    return [e.epsilon for r in _rounds(run_dir) for e in r.privacy if e.partition_id == pid]


def _ledger_rounds(run_dir: Path, pid: int) -> list[int]:
    lines = (run_dir / "ledger" / f"silo-{pid}.jsonl").read_text().splitlines()
    return [json.loads(x)["round"] for x in lines if json.loads(x)["kind"] == "dp-sgd"]


@pytest.fixture
def deployment(tmp_path: Path):
    for name in ("flower-superlink", "flower-supernode", "flwr"):
        flower_bin(name)  # a missing executable fails loudly
    with LocalDeployment(tmp_path / "run", 2) as dep:
        yield dep


def test_a_silo_killed_after_round_1_and_restarted_keeps_its_rows_and_its_epsilon(deployment):
    run_dir = deployment.run_dir
    app = deployment.start_app({**CONFIG, "num-server-rounds": 4, "run-dir": str(run_dir)})
    _wait_for_round(run_dir, 1)
    deployment.kill_supernode(1)
    (store,) = (deployment.state_root / "silo-1").iterdir()  # <state-dir>/<run id>
    had = fingerprint(load_arrays(store / "user-params.npz"))
    deployment.start_supernode(1)
    assert app.wait(900) == 0, "".join(app.lines)[-3000:]

    rounds = _rounds(run_dir)
    assert [r.server_round for r in rounds] == [1, 2, 3, 4]
    eps = _silo_epsilons(run_dir, 1)
    assert eps == sorted(eps) and len(set(eps)) == len(eps)  # grows from where it was
    trained = _ledger_rounds(run_dir, 1)
    assert trained[0] == 1 and trained[-1] == 4 and len(trained) == len(set(trained))
    # Same mechanism as a silo that never restarted: ε after k rounds is the same function of k.
    (mech,) = {(e.noise_multiplier, e.sample_rate, e.steps) for r in rounds for e in r.privacy if e.partition_id == 1 and e.trained}
    delta = next(e.delta for e in rounds[0].privacy if e.partition_id == 1)
    assert eps[-1] == pytest.approx(epsilon([MechanismUse(*mech)] * len(trained), delta), rel=1e-9)
    # The restarted silo restored exactly the rows it had when it was killed.
    log = deployment.supernode_log(1).read_text(errors="replace")
    restored = re.findall(r"silo 1 restored its state .*user params (\w+)", log)
    assert restored and restored[0] == had, (restored, had)
    assert not audit_run(run_dir, empirical=False).problems


def _serverapp_pids(address: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if "flwr-serverapp" in cmd and address in cmd:
                    pids.append(int(entry.name))
    return pids


def test_server_killed_after_round_2_resumes_without_counting_a_round_twice(deployment):
    run_dir = deployment.run_dir
    config = {**CONFIG, "num-server-rounds": 3, "run-dir": str(run_dir)}
    app = deployment.start_app(config)
    _wait_for_round(run_dir, 2)
    pids = _serverapp_pids(deployment.address)
    assert pids, "no flwr-serverapp process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    app.wait(120)
    done = len(_rounds(run_dir))
    assert done == 2, f"the server was not killed in time ({done} rounds done)"

    again = deployment.start_app({**config, "resume": True})
    assert again.wait(900) == 0, "".join(again.lines)[-3000:]
    rounds = _rounds(run_dir)
    assert [r.server_round for r in rounds] == [1, 2, 3]
    for pid in range(2):
        assert _ledger_rounds(run_dir, pid) == [1, 2, 3]  # each round counted once
        eps = _silo_epsilons(run_dir, pid)
        (mech,) = {(e.noise_multiplier, e.sample_rate, e.steps) for r in rounds for e in r.privacy if e.partition_id == pid}
        delta = next(e.delta for e in rounds[0].privacy if e.partition_id == pid)
        # The ledger of an uninterrupted run: ε after round k = k rounds of the same mechanism.
        assert eps == pytest.approx([epsilon([MechanismUse(*mech)] * k, delta) for k in (1, 2, 3)], rel=1e-9)
    assert not audit_run(run_dir, empirical=False).problems
