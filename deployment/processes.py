"""Process supervision: start with a log, wait for a port or a health check, stop by PID.

Every Flower process fedrec starts runs in its own session (process group) with its
output in a log file, and is stopped by PID: nothing here matches processes by name
except through an address we chose.

Nothing outlives the fedrec process, even one killed with SIGKILL: a process fedrec
starts directly gets a parent-death signal (Linux ``PR_SET_PDEATHSIG``,
:func:`die_with_parent`), and a Flower server process, which detaches its own
children into new sessions, runs under :mod:`deployment.watchdog` (:func:`spawn`),
which takes its whole tree down when fedrec goes away.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from common.errors import FedrecError

REPO = Path(__file__).resolve().parents[1]
"""This repository: the Flower app ``flwr run`` submits, and where the watchdog starts."""

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PR_SET_CHILD_SUBREAPER = 36

WATCHDOG_GRACE = 10.0
"""Seconds the watchdog gives its command, then the rest of its tree, to exit on SIGTERM."""


class LaunchError(FedrecError, RuntimeError):
    """A Flower process could not be started or failed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    func: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl  # the C library's
    return func


def set_child_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``).

    Whatever a child starts, even into a new session, then stays a descendant of this
    process after its own parent exits, so :func:`descendants` still finds it.
    """
    prctl = _prctl()
    return prctl is not None and prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, so it is
    only set from the main thread (elsewhere: None, no parent-death signal; the
    watchdog also checks its parent every 0.2 s). None off Linux.
    """
    prctl = _prctl()
    if prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    number = int(sig)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, number, 0, 0, 0)

    return preexec


def watchdog_command(args: Sequence[str], *, cwd: Path) -> list[str]:
    """``args`` run under :mod:`deployment.watchdog` in ``cwd``, watching this process."""
    return [
        sys.executable, "-m", "deployment.watchdog",
        "--parent", str(os.getpid()), "--cwd", str(cwd), "--grace", f"{WATCHDOG_GRACE:g}",
        "--", *args,
    ]


def spawn(
    args: list[str], log: Path, env: Mapping[str, str], *, cwd: Path, append: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``args`` under a watchdog, in a new session, with its output in ``log``.

    The log's first line is the command. The returned process is the watchdog
    (:mod:`deployment.watchdog`): it exits with the command's exit status, stops the
    command's whole tree (what Flower detached included) on SIGTERM, and does the same
    when this process dies, even by SIGKILL. Stop it with :func:`stop`.
    """
    with log.open("ab" if append else "wb") as out:
        out.write(f"$ {shlex.join(args)}\n".encode())
        out.flush()
        # The watchdog starts in the repository, so ``-m deployment.watchdog`` imports
        # this checkout (a run directory may hold a ``deployment/`` folder of its own);
        # it starts the command in ``cwd``.
        return subprocess.Popen(
            watchdog_command(args, cwd=cwd), stdout=out, stderr=subprocess.STDOUT,
            env=dict(env), cwd=REPO, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )


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


def wait_for_health(
    port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path, *, cafile: Path | None
) -> None:
    """Wait until *our* process answers ``GET /health`` on 127.0.0.1:``port``.

    With ``cafile`` the request is HTTPS, verified with that CA. An open port alone is
    not enough: another process may hold it (a port picked by :func:`free_port` can be
    taken before the SuperLink binds it).
    """
    context = ssl.create_default_context(cafile=os.fspath(cafile)) if cafile is not None else None
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(
                f"process exited with code {proc.returncode}; see {log}:\n{tail(log, 15)}"
            )
        conn = (
            http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
            if context is not None
            else http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        )
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                time.sleep(0.3)  # a SuperLink that lost the port race exits right away
                if proc.poll() is None:
                    return
                continue
        except (OSError, http.client.HTTPException) as e:
            last_error = f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        time.sleep(0.3)
    raise LaunchError(
        f"no healthy SuperLink on 127.0.0.1:{port} within {timeout:.0f}s "
        f"(last error: {last_error or 'none'}); see {log}"
    )


def tail(path: Path, lines: int = 30) -> str:
    """Last ``lines`` lines of a log file."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop(proc: subprocess.Popen[bytes], grace: float = 3 * WATCHDOG_GRACE) -> None:
    """Stop a process group started by us: SIGTERM, then SIGKILL after ``grace`` s.

    The default leaves a watchdog (:func:`spawn`) the time to stop its whole tree.
    """
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


def kill_tree(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to a process group we started and to its descendants."""
    if proc.poll() is not None:
        return
    tree = descendants([proc.pid])
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill_using(address: str) -> None:
    """SIGKILL every process whose command line names ``address``."""
    for pid in processes_using(address):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


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
