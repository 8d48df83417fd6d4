"""Start and stop a private Flower SuperLink, and run the app on it with ``flwr run``.

fedrec never uses the shared auto-started local SuperLink: that one installs the
app's dependencies at run time (offline machines fail; it may fetch CUDA torch) and
is shared by everyone on the machine. Each run gets its own SuperLink on a free
port, its own ``FLWR_HOME``, and is stopped by PID afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import FedrecError

REPO = Path(__file__).resolve().parents[1]


class LaunchError(FedrecError, RuntimeError):
    """A Flower process could not be started or failed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_bin(name: str) -> str:
    """Path of a Flower executable installed beside this Python."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise LaunchError(f"{name} not found: install fedrec (pip install -e .) in this environment")
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: our FLWR_HOME, this Python's bin dir first."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    """Wait until ``port`` accepts connections or ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(f"process exited with code {proc.returncode}; see {log}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.2)
    raise LaunchError(f"port {port} did not open within {timeout:.0f}s; see {log}")


def tail(path: Path, lines: int = 30) -> str:
    """Last ``lines`` lines of a log file."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop a process group started by us: SIGTERM, then SIGKILL after ``grace`` s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def processes_using(address: str) -> list[int]:
    """PIDs of processes whose command line contains ``address`` (Linux /proc)."""
    pattern = re.compile(re.escape(address) + r"(?!\d)")  # port 5613 must not match 56133
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            if pattern.search(cmdline.decode(errors="replace")):
                pids.append(int(entry.name))
    return pids


def stop_detached(address: str, grace: float = 15.0) -> None:
    """Stop processes Flower detached from our process group (SuperExec, flwr-simulation).

    The SuperLink starts SuperExec in a new session, which starts the simulation
    (ServerApp + Ray) in turn; they exit on their own when a run ends, but not when
    the run is interrupted. They name the SuperLink's address on their command line.
    """
    pids = processes_using(address)
    tree = descendants(pids)  # Ray's raylet and agents, taken before they are orphaned
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in [*processes_using(address), *tree]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def descendants(roots: list[int]) -> list[int]:
    """All descendants of ``roots`` (Linux /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    frontier = list(roots)
    while frontier:
        kids = [c for p in frontier for c in children.get(p, [])]
        out += kids
        frontier = kids
    return out


@dataclass
class SuperLink:
    """A running SuperLink we own."""

    proc: subprocess.Popen[bytes]
    port: int
    flwr_home: Path
    log: Path

    @property
    def address(self) -> str:
        """``host:port`` of its HTTP API."""
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def superlink(
    workdir: Path,
    *,
    simulation: bool,
    extra_args: Sequence[str] = (),
    connection_extra: str = "insecure = true",
    startup_timeout: float = 60.0,
) -> Iterator[SuperLink]:
    """Start a SuperLink on a free port with its own FLWR_HOME; stop it on exit.

    The connection is registered in ``$FLWR_HOME/config.toml`` as ``fedrec``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    port = free_port()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "fedrec"\n\n'
        f'[superlink.fedrec]\naddress = "127.0.0.1:{port}"\n{connection_extra}\n'
    )
    log = workdir / "superlink.log"
    args = [
        flower_bin("flower-superlink"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--disable-runtime-dependency-installation",
        "--database", str(workdir / "superlink.db"),
        *(["--simulation"] if simulation else []),
        *extra_args,
    ]
    if "--ssl-certfile" not in extra_args:
        args.insert(1, "--insecure")
    env = flower_env(flwr_home)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
        )
    try:
        wait_for_port(port, proc, startup_timeout, log)
        yield SuperLink(proc, port, flwr_home, log)
    finally:
        stop(proc)
        stop_detached(f"127.0.0.1:{port}")


def flwr_run(
    link: SuperLink,
    *,
    app_dir: Path = REPO,
    run_config: dict[str, object] | None = None,
    federation_config: str = "",
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> int:
    """``flwr run <app> fedrec --stream`` against ``link``; return its exit code.

    Every output line goes to ``on_line`` (default: printed).
    """
    args = [flower_bin("flwr"), "run", str(app_dir), "fedrec", "--stream"]
    if run_config:
        # One TOML file, not one --run-config per key: flwr 1.41 merges repeated
        # --run-config flags with dict.update, so a second `data.*` key drops the first.
        overrides = link.flwr_home.parent / "run-config.toml"
        overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
        args += ["--run-config", str(overrides)]
    if federation_config:
        args += ["--federation-config", federation_config]
    env = flower_env(link.flwr_home)
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    assert proc.stdout is not None
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            if on_line is None:
                sys.stdout.write(line)
            else:
                on_line(line)
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchError(f"flwr run exceeded {timeout:.0f}s")
        return proc.wait()
    finally:
        stop(proc)


def toml_value(value: object) -> str:
    """Render a Python scalar as a TOML value for ``--run-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'

