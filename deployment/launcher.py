"""Start a private Flower SuperLink, and run the app on a SuperLink with ``flwr run``.

fedrec never uses the shared auto-started local SuperLink: that one installs the
app's dependencies at run time (offline machines fail; it may fetch CUDA torch) and
is shared by everyone on the machine. Each run gets its own SuperLink on a free
port, its own ``FLWR_HOME``, and is stopped by PID afterwards.

:func:`flwr_run` (blocking) and :func:`start_flwr_run` (returns an :class:`AppRun`)
are the one way fedrec submits a run, for ``fedrec simulate`` and for
:class:`deployment.local.LocalDeployment` alike; :func:`write_run_config` is the one
writer of the run config they pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from common.rundir import FlowerDir
from common.storage import atomic_write_bytes
from deployment.processes import (
    REPO,
    LaunchError,
    die_with_parent,
    free_port,
    spawn,
    stop,
    stop_detached,
    wait_for_port,
)

CONNECTION = "fedrec"
"""Name of the SuperLink connection in ``$FLWR_HOME/config.toml``."""

_RUN_ID = re.compile(r"Successfully started run (\d+)")


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


def _env(flwr_home: Path, env: Mapping[str, str] | None) -> dict[str, str]:
    return dict(env) if env is not None else flower_env(flwr_home)


def write_connection_config(flwr_home: Path, address: str, security: str) -> None:
    """Register the SuperLink at ``address`` as the default connection :data:`CONNECTION`.

    ``security`` is the connection's TLS line: ``insecure = true`` or
    ``root-certificates = "<ca.crt>"``.
    """
    atomic_write_bytes(
        flwr_home / "config.toml",
        (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'
        ).encode(),
    )


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

    The connection is registered in ``$FLWR_HOME/config.toml`` as ``fedrec``. The
    SuperLink runs under :mod:`deployment.watchdog` (:func:`deployment.processes.spawn`),
    so it and everything it detached stop when this process dies, even by SIGKILL.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    files = FlowerDir(workdir)
    files.flwr_home.mkdir(exist_ok=True)
    port = free_port()
    write_connection_config(files.flwr_home, f"127.0.0.1:{port}", connection_extra)
    log = files.superlink_log
    args = [
        flower_bin("flower-superlink"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--disable-runtime-dependency-installation",
        "--database", str(files.database),
        *(["--simulation"] if simulation else []),
        *extra_args,
    ]
    if "--ssl-certfile" not in extra_args:
        args.insert(1, "--insecure")
    # Under a watchdog: SuperExec, the simulation and Ray go down with it, and with us.
    proc = spawn(args, log, flower_env(files.flwr_home), cwd=workdir)
    try:
        wait_for_port(port, proc, startup_timeout, log)
        yield SuperLink(proc, port, files.flwr_home, log)
    finally:
        stop(proc)
        stop_detached(f"127.0.0.1:{port}")


@dataclass
class AppRun:
    """A running ``flwr run --stream``, started by :func:`start_flwr_run`.

    A reader thread passes every output line to the log file (if any), to
    :attr:`lines` and to ``on_line``; :attr:`run_id` is set once Flower prints it.
    """

    proc: subprocess.Popen[bytes]
    log: Path | None
    run_id: int | None = None
    lines: list[str] = field(default_factory=list)
    log_error: str | None = None  # why the log could not be written (the run goes on)
    _reader: threading.Thread | None = None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for ``flwr run`` to exit (the run finished or failed); return its code.

        Raises
        ------
        subprocess.TimeoutExpired
            If it is still running after ``timeout`` seconds (it keeps running).
        """
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def stop(self) -> None:
        """Stop the ``flwr run`` client (the run itself goes on in the SuperLink)."""
        stop(self.proc)
        if self._reader is not None:
            self._reader.join(5)


def start_flwr_run(
    flwr_home: Path,
    *,
    app_dir: Path = REPO,
    run_config: Mapping[str, object] | None = None,
    federation_config: str = "",
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    append: bool = True,
    on_line: Callable[[str], None] | None = None,
) -> AppRun:
    """Start ``flwr run <app_dir> fedrec --stream`` against the connection in ``flwr_home``.

    Parameters
    ----------
    flwr_home : Path
        A ``FLWR_HOME`` whose ``config.toml`` names the SuperLink as :data:`CONNECTION`.
    app_dir : Path
        The Flower app to run (this repository).
    run_config : Mapping[str, object] | None
        Run-config overrides, passed in one file (see :func:`write_run_config`).
    federation_config : str
        ``--federation-config`` (simulation: ``num-supernodes=N ...``).
    env : Mapping[str, str] | None
        The process environment; default :func:`flower_env` of ``flwr_home``.
    log : Path | None
        Every output line is written here (appended, or a new file if not ``append``).
    on_line : Callable[[str], None] | None
        Called with every output line, from the reader thread.

    Returns
    -------
    AppRun
        The running ``flwr run``; :meth:`AppRun.wait` for its exit code.
    """
    args = [flower_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
    if run_config:
        args += ["--run-config", str(write_run_config(FlowerDir(flwr_home.parent).run_config, run_config))]
    if federation_config:
        args += ["--federation-config", federation_config]
    out = None if log is None else log.open("a" if append else "w")
    try:
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=_env(flwr_home, env), start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGKILL),  # a client only: nothing to clean up
        )
    except BaseException:
        if out is not None:
            out.close()
        raise
    run = AppRun(proc, log)

    def read() -> None:
        assert proc.stdout is not None
        sink = out
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            if sink is not None:
                try:
                    sink.write(line)
                    sink.flush()
                except OSError as exc:  # disk full: say so once, keep draining the pipe
                    run.log_error = f"{log}: cannot write ({exc.strerror}); the log stops here"
                    line = f"ERROR: {run.log_error}\n{line}"
                    _close_quietly(sink)
                    sink = None
            run.lines.append(line)
            if run.run_id is None and (m := _RUN_ID.search(line)):
                run.run_id = int(m.group(1))
            if on_line is not None:
                on_line(line)
        if sink is not None:
            _close_quietly(sink)

    run._reader = threading.Thread(target=read, daemon=True)
    run._reader.start()
    return run


def _close_quietly(file: IO[str]) -> None:
    """Close a log whose last write failed (its unwritten buffer cannot be saved either)."""
    with contextlib.suppress(OSError):
        file.close()


def flwr_run(
    flwr_home: Path,
    *,
    app_dir: Path = REPO,
    run_config: Mapping[str, object] | None = None,
    federation_config: str = "",
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    append: bool = True,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> int:
    """:func:`start_flwr_run` and wait until it exits; return its exit code.

    Lines go to ``on_line`` (default: printed). ``flwr run`` is stopped when this
    returns or raises (also on Ctrl-C).

    Raises
    ------
    LaunchError
        If it runs longer than ``timeout`` seconds.
    """
    run = start_flwr_run(
        flwr_home, app_dir=app_dir, run_config=run_config, federation_config=federation_config,
        env=env, log=log, append=append, on_line=on_line or _print,
    )
    try:
        return run.wait(timeout)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"flwr run exceeded {timeout:.0f}s") from None
    finally:
        run.stop()


def _print(line: str) -> None:
    sys.stdout.write(line)


def register_supernode(flwr_home: Path, public_key: Path, *, env: Mapping[str, str] | None = None) -> int:
    """``flwr supernode register <public_key>``; return the node ID Flower assigned."""
    proc = subprocess.run(
        [flower_bin("flwr"), "supernode", "register", str(public_key), CONNECTION, "--format", "json"],
        check=False, capture_output=True, text=True, env=_env(flwr_home, env), timeout=60,
    )
    try:
        reply = json.loads(proc.stdout[proc.stdout.find("{"):])
    except ValueError:
        reply = {}
    if proc.returncode != 0 or not reply.get("success"):
        raise LaunchError(
            f"flwr supernode register {public_key} failed (exit code {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return int(reply["node-id"])


def stop_flwr_run(flwr_home: Path, run_id: int, *, env: Mapping[str, str] | None = None) -> None:
    """``flwr stop <run_id>``: end a run on the SuperLink (its ServerApp stops)."""
    proc = subprocess.run(
        [flower_bin("flwr"), "stop", str(run_id), CONNECTION],
        check=False, capture_output=True, text=True, env=_env(flwr_home, env), timeout=60,
    )
    if proc.returncode != 0:
        raise LaunchError(f"flwr stop {run_id} failed (exit code {proc.returncode}):\n{proc.stdout[-2000:]}")


def write_run_config(path: Path, run_config: Mapping[str, object]) -> Path:
    """Write ``run_config`` as the TOML file ``flwr run --run-config`` takes; return ``path``.

    One file, not one ``--run-config`` per key: flwr 1.41 merges repeated
    ``--run-config`` flags with ``dict.update``, so a second ``data.*`` key drops the first.
    Keys are written bare (``data.path = "..."``: TOML dotted keys), so the file reads
    back, flattened, as the same keys.
    """
    atomic_write_bytes(path, run_config_text(run_config).encode())
    return path


def run_config_text(run_config: Mapping[str, object]) -> str:
    """The text of a run-config file: one ``key = value`` line per key."""
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items())


def toml_value(value: object) -> str:
    """Render a Python scalar as a TOML value for ``--run-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
