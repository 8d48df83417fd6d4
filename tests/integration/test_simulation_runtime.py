"""The app on Flower's real simulation runtime (SuperLink + Ray), as `fedrec simulate` runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.rundir import RunDir

pytestmark = [pytest.mark.runtime, pytest.mark.slow]


def test_fedrec_simulate_runs_rounds_on_ray_and_cleans_up(tmp_path: Path):
    # Arrange
    run_dir = tmp_path / "run"
    args = [
        sys.executable, "-m", "cli.main", "simulate",
        "--silos", "3", "--rounds", "2", "--run-dir", str(run_dir),
        "-c", "data.synthetic.num-users=300", "-c", "data.synthetic.num-items=300",
        "-c", "model.dim=8",
    ]
    # Act
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fedrec round 2/2" in proc.stdout
    rounds = RunDir(run_dir).read_rounds()
    assert [r.server_round for r in rounds] == [1, 2]
    assert rounds[-1].evaluate["silos"] == 3
    assert (run_dir / "report.md").is_file()
    # Several keys of one table all reach the ServerApp (flwr merges repeated
    # --run-config flags lossily; fedrec passes one file).
    run_config = json.loads((run_dir / "config.json").read_text())["run-config"]
    assert run_config["data.synthetic.num-users"] == 300
    assert run_config["data.synthetic.num-items"] == 300
    assert run_config["model.dim"] == 8
    # Every silo's users' rows survived the run on disk, and fedrec recommend serves them.
    uid = RunDir(run_dir).read_config().run_uid
    assert all((run_dir / "silos" / f"silo-{k}" / uid / "user-params.npz").is_file() for k in range(3))
    top = subprocess.run([sys.executable, "-m", "cli.main", "recommend", str(run_dir), "--user", "u5", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert top.returncode == 0, top.stderr[-2000:]
    assert len({e["item"] for e in json.loads(top.stdout)["items"]}) == 10
    # The SuperLink we started (and everything under it) is gone.
    pid_lines = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(run_dir / "flower") not in pid_lines


def test_interrupted_simulate_stops_everything_and_keeps_finished_rounds(tmp_path: Path):
    # Arrange
    import re
    import signal
    import time

    from deployment.processes import processes_using

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "simulate", "--silos", "2", "--rounds", "200",
         "--run-dir", str(run_dir), "-c", "data.synthetic.num-users=200", "-c", "data.synthetic.num-items=300"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.5)
    assert metrics.exists(), "no round finished within 300 s"
    config = (run_dir / "flower" / "flwr-home" / "config.toml").read_text()
    address = re.search(r'address = "([^"]+)"', config).group(1)
    # Act
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    # Assert
    assert processes_using(address) == []
    lines = metrics.read_text().splitlines()
    assert lines and json.loads(lines[0])["round"] == 1
    assert (run_dir / "checkpoints" / "round-0001.npz").is_file()


def test_simulate_with_local_dp_prints_epsilon_per_silo_and_stops_at_the_budget(tmp_path: Path):
    # Arrange: σ = 1.5 on ~100 users per silo at δ = 1e-5: ε is ~1.8 after one round, so a
    # budget of 3 lasts two or three rounds, never six.
    run_dir = tmp_path / "run"
    args = [
        sys.executable, "-m", "cli.main", "simulate",
        "--silos", "3", "--rounds", "6", "--run-dir", str(run_dir),
        "-c", "data.synthetic.num-users=300", "-c", "data.synthetic.num-items=300",
        "-c", "model.dim=8", "-c", "privacy.mode=local", "-c", "privacy.local.target-epsilon=3.0",
        "-c", "privacy.local.batch-size=16",
    ]
    # Act
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "silo 0: ε=" in proc.stdout and "DECLINED" in proc.stdout
    assert "every silo reached its privacy budget" in proc.stdout
    rounds = RunDir(run_dir).read_rounds()
    assert 1 < len(rounds) < 6
    for r in rounds:
        assert {e.partition_id for e in r.privacy} == {0, 1, 2}
        assert all(e.epsilon <= 3.0 for e in r.privacy)
    assert not all(e.trained for e in rounds[-1].privacy)
    assert "## Privacy" in (run_dir / "report.md").read_text()
    # The run directory of a real Ray simulation passes `fedrec audit` (budget declines included).
    audit = subprocess.run(
        [sys.executable, "-m", "cli.main", "audit", str(run_dir)], capture_output=True, text=True,
        timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
    assert "audit passed" in audit.stdout
    statement = (run_dir / "audit.md").read_text()
    assert "declined round" in statement and (run_dir / "audit-epsilon-delta.png").exists()


def test_python_api_simulate_on_flowers_runtime_returns_the_finished_run(tmp_path: Path, monkeypatch):
    # fedrec.simulate(runtime="flower") is `fedrec simulate` as a function: it returns when the run ends.
    import fedrec

    monkeypatch.chdir(tmp_path)
    small = {"num-server-rounds": 1, "data.synthetic.num-users": 200, "data.synthetic.num-items": 300, "model.dim": 8}
    run = fedrec.simulate(small, runtime="flower", run_dir=tmp_path / "run", silos=2)
    assert [m["round"] for m in run.metrics] == [1]
    assert run.run_config["model.dim"] == 8 and run.final_model.is_file()
    rec = run.load(silo=1)
    assert len(rec.recommend(rec.user_ids[:1], 5)[0].items) == 5
