"""``python -m deployment.watchdog``: run a Flower process; take its whole tree down with fedrec.

A SuperLink or SuperNode detaches what it starts into new sessions (SuperExec, the
ServerApp or ``flwr-simulation``, Ray's GCS, raylet and workers), so a fedrec process
killed with SIGKILL would leave them running and listening. fedrec therefore starts
each of them under this watchdog (:func:`deployment.processes.spawn`)::

    python -m deployment.watchdog --parent <fedrec pid> --cwd <dir> -- flower-superlink ...

The watchdog makes itself a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``), so
everything its command starts stays its descendant even after an intermediate
process exits, and runs the command in ``--cwd``. It stops the whole tree (SIGTERM,
SIGKILL after ``--grace`` seconds) when

- its parent is gone: fedrec died, even by SIGKILL (``PR_SET_PDEATHSIG`` set by the
  parent, and a check of ``getppid()`` every 0.2 s);
- it receives SIGTERM, SIGINT or SIGHUP (fedrec stopping it);
- the command exits (what it detached goes with it).

It exits with the command's exit status (killed by a signal: the same signal).
Only its own descendants are ever signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

from deployment.processes import descendants, die_with_parent, set_child_subreaper

_POLL = 0.2  # seconds between checks of the parent and the command


@dataclass
class _Watch:
    """What the main loop watches: the command, and whether a stop was asked for."""

    parent: int
    child: subprocess.Popen[bytes] | None = None
    code: int | None = None  # the command's exit code, once reaped
    stop_signal: int | None = None

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signal = signum

    def parent_gone(self) -> bool:
        return os.getppid() != self.parent

    def reap(self) -> bool:
        """Reap every exited child (ours and adopted orphans); True when none is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                return False
            if self.child is not None and pid == self.child.pid:
                self.code = os.waitstatus_to_exitcode(status)
                self.child.returncode = self.code  # reaped here, not by Popen

    def command_running(self) -> bool:
        return self.child is not None and self.code is None


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _stop_tree(watch: _Watch, grace: float) -> None:
    """SIGTERM the command, then every descendant; SIGKILL what is left after ``grace`` s each."""
    if watch.command_running():
        assert watch.child is not None
        _signal_all([watch.child.pid], signal.SIGTERM)
        deadline = time.monotonic() + grace
        while watch.command_running() and time.monotonic() < deadline:
            watch.reap()
            time.sleep(0.05)
    _signal_all(descendants([os.getpid()]), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while not watch.reap() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = descendants([os.getpid()])
    if left:
        print(f"watchdog: SIGKILL to {len(left)} processes still running after {grace:g} s", file=sys.stderr)
        _signal_all(left, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while not watch.reap() and time.monotonic() < deadline:
        time.sleep(0.05)


def _exit_like(code: int | None) -> int:
    """Exit as the command did: its code, or re-raise the signal that killed it."""
    if code is None:
        return 1
    if code < 0:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command under watch; return the exit status to leave with."""
    parser = argparse.ArgumentParser(prog="python -m deployment.watchdog", description=__doc__.split("\n")[0])
    parser.add_argument("--parent", type=int, required=True, help="PID whose death stops the command's tree")
    parser.add_argument("--cwd", required=True, help="working directory of the command")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    watch = _Watch(parent=args.parent)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, watch.on_signal)
    set_child_subreaper()
    # The parent set PR_SET_PDEATHSIG before exec (:func:`deployment.processes.spawn`);
    # a parent that died before that is seen here, and later ones by getppid().
    if watch.parent_gone() or watch.stop_signal is not None:
        return 1
    watch.child = subprocess.Popen(command, cwd=args.cwd, preexec_fn=die_with_parent(signal.SIGKILL))
    while watch.stop_signal is None and not watch.parent_gone() and watch.command_running():
        watch.reap()
        time.sleep(_POLL)
    if watch.parent_gone():
        print(f"watchdog: parent {watch.parent} is gone; stopping {command[0]} and its tree", file=sys.stderr)
    _stop_tree(watch, args.grace)
    return _exit_like(watch.code)


if __name__ == "__main__":
    sys.exit(main())
