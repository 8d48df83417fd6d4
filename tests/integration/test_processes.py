"""Nothing fedrec starts outlives it, and one run directory has one fedrec process at a time.

Real processes on 127.0.0.1: a ``fedrec simulate`` (SuperLink, SuperExec, the
simulation and Ray under it) SIGKILLed after its first round leaves no process
behind and its port closed; while it runs, a second command on its run directory is
refused. The watchdog itself is checked on small shell trees.
"""

import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.rundir import RunDir
from deployment.processes import descendants, kill_using, processes_using

pytestmark = [pytest.mark.runtime, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TINY = ["-c", "data.synthetic.num-users=40", "-c", "data.synthetic.num-items=200", "-c", "model.dim=4",
        "-c", "eval.full-ranking=false"]
CLEANUP_S = 30.0  # how long fedrec's processes may take to go after it was killed


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def _alive(pid: int, cmdline: str) -> bool:
    """Whether ``pid`` still runs ``cmdline`` (not a zombie, not a reused pid)."""
    with contextlib.suppress(OSError, IndexError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and _cmdline(pid) == cmdline
    return False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != errno.ECONNREFUSED


@dataclass
class Simulation:
    proc: subprocess.Popen[bytes]
    run_dir: Path
    address: str
    started_s: float  # from start to the first completed round


@pytest.fixture(scope="module")
def simulation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulation]:
    """``fedrec simulate`` (2 clients, many rounds) that has completed its first round."""
    base = tmp_path_factory.mktemp("processes")
    run_dir = base / "run"
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "simulate", "--silos", "2", "--rounds", "100",
         "--run-dir", str(run_dir), *TINY],
        stdout=(base / "out.log").open("wb"), stderr=subprocess.STDOUT, cwd=base, env=ENV,
    )
    metrics = RunDir(run_dir).metrics
    while not (metrics.exists() and metrics.read_text().strip()):
        if proc.poll() is not None or time.monotonic() - start > 300:
            proc.kill()
            pytest.fail(f"no round within 300 s (exit {proc.poll()}):\n{(base / 'out.log').read_text()[-3000:]}")
        time.sleep(0.2)
    config = (run_dir / "flower" / "flwr-home" / "config.toml").read_text()
    address = re.search(r'address = "([^"]+)"', config).group(1)
    sim = Simulation(proc, run_dir, address, time.monotonic() - start)
    try:
        yield sim
    finally:  # whatever a failed test left running
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_using(address)
        kill_using(str(run_dir))  # the SuperLink names its database, not its address


def test_a_second_command_on_a_run_directory_in_use_is_refused(simulation: Simulation):
    # Arrange: the files the second command would have replaced
    run = RunDir(simulation.run_dir)
    connection = run.flower_dir / "flwr-home" / "config.toml"
    kept = {p: p.read_bytes() for p in (connection, run.simulation, run.config)}
    # Act
    second = subprocess.run(
        [sys.executable, "-m", "cli.main", "simulate", "--silos", "2", "--rounds", "3",
         "--run-dir", str(simulation.run_dir), *TINY],
        capture_output=True, text=True, timeout=120, cwd=simulation.run_dir.parent, env=ENV,
    )
    # Assert
    message = " ".join((second.stdout + second.stderr).split())
    assert second.returncode == 2, message
    assert f"{simulation.run_dir} is in use by another fedrec process (pid {simulation.proc.pid})" in message
    assert "Traceback" not in message
    assert {p: p.read_bytes() for p in kept} == kept
    assert simulation.proc.poll() is None  # the first run goes on


def test_sigkill_of_fedrec_simulate_stops_every_process_it_started(simulation: Simulation):
    # Arrange: every process under fedrec now (SuperLink, SuperExec, simulation, Ray...)
    tree = {pid: _cmdline(pid) for pid in descendants([simulation.proc.pid])}
    assert any("flower-superlink" in cmd for cmd in tree.values()), tree
    assert processes_using(simulation.address)
    port = int(simulation.address.rsplit(":", 1)[1])
    run = RunDir(simulation.run_dir)
    metrics_before = run.metrics.read_bytes()
    checkpoint_before = run.checkpoint(1).read_bytes()
    # Act
    simulation.proc.send_signal(signal.SIGKILL)
    simulation.proc.wait()
    killed = time.monotonic()
    while time.monotonic() - killed < CLEANUP_S:
        left = {pid: cmd for pid, cmd in tree.items() if _alive(pid, cmd)}
        if not left and not processes_using(simulation.address) and not _port_open(port):
            break
        time.sleep(0.2)
    cleanup_s = time.monotonic() - killed
    # Assert
    print(f"first round after {simulation.started_s:.1f} s; everything gone {cleanup_s:.1f} s after SIGKILL")
    assert {pid: cmd for pid, cmd in tree.items() if _alive(pid, cmd)} == {}
    assert processes_using(simulation.address) == []
    assert not _port_open(port)
    # What the run had saved is intact: completed rounds stay whole, the checkpoint unchanged.
    assert run.metrics.read_bytes().startswith(metrics_before)
    assert [r.server_round for r in run.read_rounds()][:1] == [1]
    assert run.checkpoint(1).read_bytes() == checkpoint_before


def _watched(tmp_path: Path, script: str) -> subprocess.Popen[str]:
    """A parent that starts ``script`` under the watchdog and prints the watchdog's pid."""
    parent = (
        "import os, time\n"
        "from pathlib import Path\n"
        "from deployment.processes import spawn\n"
        f"proc = spawn(['sh', '-c', {script!r}], Path({str(tmp_path / 'log')!r}), dict(os.environ), cwd=Path({str(tmp_path)!r}))\n"
        "print(proc.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    return subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, cwd=REPO, env=ENV)


def _wait_for_file(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} not written within {timeout} s"
        time.sleep(0.05)
    return path.read_text().strip()


def test_the_watchdog_stops_a_detached_grandchild_when_its_parent_is_sigkilled(tmp_path: Path):
    # Arrange: the command detaches a `sleep` into a new session, as Flower does
    pid_file = tmp_path / "grandchild.pid"
    parent = _watched(tmp_path, f"setsid sleep 600 & echo $! > {pid_file}; wait")
    watchdog = int(parent.stdout.readline())
    grandchild = int(_wait_for_file(pid_file))
    tree = {pid: _cmdline(pid) for pid in [watchdog, grandchild, *descendants([watchdog])]}
    # Act
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 15
    while any(_alive(pid, cmd) for pid, cmd in tree.items()) and time.monotonic() < deadline:
        time.sleep(0.1)
    # Assert
    assert [pid for pid, cmd in tree.items() if _alive(pid, cmd)] == []
    assert "watchdog: parent" in (tmp_path / "log").read_text()


def test_the_watchdog_exits_like_its_command_and_takes_what_it_detached(tmp_path: Path):
    # Arrange
    pid_file = tmp_path / "grandchild.pid"
    script = f"setsid sleep 600 & echo $! > {pid_file}; exit 7"
    # Act
    code = subprocess.run(
        [sys.executable, "-m", "deployment.watchdog", "--parent", str(os.getpid()), "--cwd", str(tmp_path),
         "--grace", "2", "--", "sh", "-c", script],
        cwd=REPO, env=ENV, timeout=60,
    ).returncode
    # Assert
    grandchild = int(pid_file.read_text())
    assert code == 7
    assert not _alive(grandchild, "sleep 600 ")
