"""`fedrec simulate --ray-address` joins a Ray cluster that is already running."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from common.rundir import RunDir

pytestmark = [pytest.mark.runtime, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    """A one-CPU Ray head on free ports, in the foreground (``--block``): stopping that process stops it all.

    Every port is chosen here (other jobs on this machine may run Ray too), and its
    session files live in a temporary directory of its own; ``ray stop`` is never
    used (it would stop every Ray on the machine).
    """
    port, client, node, obj, agent, grpc, metrics, env_agent, low = _free_ports(9)
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", "--num-cpus", "1", "--num-gpus", "0",
         "--node-ip-address", "127.0.0.1", "--port", str(port), "--ray-client-server-port", str(client),
         "--node-manager-port", str(node), "--object-manager-port", str(obj),
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(grpc),
         "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(env_agent),
         "--min-worker-port", str(low), "--max-worker-port", str(low + 30),
         "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.5)
    else:
        pytest.fail("the Ray head did not start in 40 s")
    try:
        yield f"127.0.0.1:{port}", temp
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the head and what it started
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


def test_simulate_joins_an_existing_ray_head(tmp_path: Path, ray_head):
    address, temp = ray_head
    run_dir = tmp_path / "run"
    args = [
        sys.executable, "-m", "cli.main", "simulate", "--ray-address", address,
        "--silos", "2", "--rounds", "1", "--run-dir", str(run_dir),
        "-c", "data.synthetic.num-users=200", "-c", "data.synthetic.num-items=200", "-c", "model.dim=4",
        "-c", "train.local-epochs=1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r.server_round for r in RunDir(run_dir).read_rounds()] == [1]
    # The clients ran on that cluster: its session directory has the simulation's job.
    sessions = list(Path(temp).glob("session_*/logs"))
    assert sessions and any("worker" in p.name for s in sessions for p in s.iterdir()), sessions
