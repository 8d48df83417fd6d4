"""Deploy the app on one machine with real Flower processes: TLS, node auth, SuperNodes.

:class:`LocalDeployment` (behind ``fedrec deploy local``) creates a CA, a server
certificate and one ECDSA P-384 key pair per SuperNode, starts a SuperLink with TLS
and SuperNode authentication, registers each node's public key, starts one
``flower-supernode`` per silo and runs the app with ``flwr run``. Every process has a
log file under the run directory and is stopped by PID.

Layout of a run directory (names from :class:`common.rundir.RunDir`)::

    credentials/          ca.crt ca.key server.crt server.key supernode-<i>[.pub]
    superlink/            flwr-home/ (connection config, FABs)  superlink.db  run-config.toml
    supernodes/node-<i>/  flwr-home/ of SuperNode i
    silos/silo-<i>/       state-dir of silo i (default --state-root)
    logs/                 superlink.log  supernode-<i>.log  flwr-run.log
    metrics.jsonl report.md state.json ...   written by the ServerApp (run config run-dir)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Self

from common.rundir import FlowerDir, RunDir
from deployment.launcher import (
    REPO,
    AppRun,
    SuperLink,
    flower_bin,
    flower_env,
    flwr_run,
    register_supernode,
    start_flwr_run,
    stop_flwr_run,
    write_connection_config,
)
from deployment.pki import Credentials, create_credentials
from deployment.processes import (
    LaunchError,
    free_port,
    kill_tree,
    kill_using,
    spawn,
    stop,
    stop_detached,
    wait_for_health,
    wait_for_port,
)
from deployment.supernode import SuperNodeProcess, node_config, silo_dir
from deployment.tuning import TUNED, Tuning

# Flower's legacy gRPC Fleet/Control servers open extra ports (9092/9093) only when
# these are "1"; the launcher removes them so the SuperLink listens on one port.
_LEGACY_GRPC_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


class LocalDeployment:
    """A Flower federation on this machine: one SuperLink and ``num_supernodes`` SuperNodes.

    Use it as a context manager; :meth:`stop` (called on exit, also after errors)
    stops every process by PID. Every piece can also be driven on its own, which
    fault-injection tests need::

        with LocalDeployment(tmp_path / "run", 3) as dep:     # SuperLink + 3 SuperNodes
            app = dep.start_app({"num-server-rounds": 5, "run-dir": str(dep.run_dir)})
            ...                                               # wait for round 1 in app.lines
            dep.kill_supernode(1)                             # SIGKILL, no goodbye
            dep.start_supernode(1)                            # same key, node config, port
            assert app.wait(600) == 0                         # (restart takes ~60 s, see below)

    A SuperNode killed with SIGKILL stays "online" in the SuperLink until its
    heartbeat lapses (2 x 30 s in flwr 1.41) and its key is refused until then;
    :meth:`start_supernode` retries for that long after :meth:`kill_supernode`.

    Parameters
    ----------
    run_dir : Path
        Where credentials, logs, Flower state and the run's results go.
    num_supernodes : int
        Number of silos; SuperNode ``i`` gets ``partition-id=i num-partitions=N``.
    tls : bool
        TLS on the SuperLink (all its APIs); ``False`` runs everything ``--insecure``.
    auth : bool
        SuperNode authentication (needs ``tls``): only registered keys may connect.
    tuning : Tuning
        Latency settings; :data:`TUNED` by default, :data:`FLOWER_DEFAULTS` for Flower's.
    data_root : Path | None
        If given, SuperNode ``i`` gets ``data-path=<data_root>/silo-<i>`` (the layout
        ``fedrec data prepare`` writes); otherwise silos use the run config's data.
    state_root : Path | None
        SuperNode ``i`` gets ``state-dir=<state_root>/silo-<i>``; default
        ``<run_dir>/silos``.
    start_supernodes : bool
        Whether entering the context starts all SuperNodes (else call
        :meth:`start_supernode` yourself).
    startup_timeout : float
        Seconds a process may take to come up before it counts as failed.
    """

    def __init__(
        self,
        run_dir: Path,
        num_supernodes: int,
        *,
        tls: bool = True,
        auth: bool = True,
        tuning: Tuning = TUNED,
        data_root: Path | None = None,
        state_root: Path | None = None,
        start_supernodes: bool = True,
        startup_timeout: float = 90.0,
    ) -> None:
        if num_supernodes < 1:
            raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
        if auth and not tls:
            raise ValueError(
                "SuperNode authentication needs TLS (Flower refuses node auth over plain "
                "HTTP): use tls=True or auth=False"
            )
        self.run_dir = run_dir.resolve()
        self.files = RunDir(self.run_dir)
        self.num_supernodes = num_supernodes
        self.tls = tls
        self.auth = auth
        self.tuning = tuning
        self.data_root = data_root.resolve() if data_root is not None else None
        self.state_root = (state_root or self.files.silo_states).resolve()
        self.start_supernodes_on_enter = start_supernodes
        self.startup_timeout = startup_timeout
        self.credentials = Credentials(self.files.credentials)
        self.log_dir = self.files.logs
        self.superlink_dir = self.files.superlink_dir
        self.flwr_home = FlowerDir(self.superlink_dir).flwr_home
        self.port: int | None = None
        self.superlink_proc: subprocess.Popen[bytes] | None = None
        self.supernodes: dict[int, SuperNodeProcess] = {}
        self.node_ids: dict[int, int] = {}
        self._apps: list[AppRun] = []
        self._node_ports: dict[int, int] = {}
        self._lost_at: dict[int, float] = {}  # when a SuperNode of ours last went down

    def __enter__(self) -> Self:
        try:
            self.start()
            if self.start_supernodes_on_enter:
                self.start_all_supernodes()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>`` of the SuperLink (Fleet, Control and Runtime APIs)."""
        if self.port is None:
            raise LaunchError("the SuperLink has not been started")
        return f"127.0.0.1:{self.port}"

    @property
    def superlink_log(self) -> Path:
        """Log file of the SuperLink."""
        return self.files.superlink_log

    def supernode_log(self, index: int) -> Path:
        """Log file of SuperNode ``index`` (appended to across restarts)."""
        return self.files.supernode_log(index)

    @property
    def superlink(self) -> SuperLink:
        """The SuperLink as :mod:`deployment.launcher` describes it."""
        if self.superlink_proc is None or self.port is None:
            raise LaunchError("the SuperLink has not been started")
        return SuperLink(self.superlink_proc, self.port, self.flwr_home, self.superlink_log)

    def node_config(self, index: int) -> str:
        """The ``--node-config`` string of SuperNode ``index``."""
        return node_config(index, self.num_supernodes, data_root=self.data_root, state_root=self.state_root)

    def start(self) -> None:
        """Create credentials (if missing), start the SuperLink, register node keys."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if self.tls:
            create_credentials(self.credentials.directory, self.num_supernodes)
        self.port = self.port or free_port()
        security = (
            f'root-certificates = "{self.credentials.ca_cert}"' if self.tls else "insecure = true"
        )
        write_connection_config(self.flwr_home, self.address, security)
        self.start_superlink()
        if self.auth:
            for i in range(self.num_supernodes):
                if i not in self.node_ids:
                    self.node_ids[i] = self.register_key(self.credentials.node_public_key(i))

    def superlink_command(self) -> list[str]:
        """The ``flower-superlink`` command line (no ``--simulation``)."""
        if self.port is None:
            raise LaunchError("no SuperLink port chosen yet: call start()")
        args = [flower_bin("flower-superlink")]
        if self.tls:
            c = self.credentials
            args += [
                "--ssl-ca-certfile", str(c.ca_cert),
                "--ssl-certfile", str(c.server_cert),
                "--ssl-keyfile", str(c.server_key),
            ]
        else:
            args.append("--insecure")
        if self.auth:
            args.append("--enable-supernode-auth")
        args += [
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--disable-runtime-dependency-installation",
            "--database", str(FlowerDir(self.superlink_dir).database),
        ]
        return args

    def start_superlink(self) -> None:
        """Start (or restart, on the same port and database) the SuperLink."""
        if self.superlink_proc is not None and self.superlink_proc.poll() is None:
            raise LaunchError(f"the SuperLink is already running (PID {self.superlink_proc.pid})")
        self.superlink_proc = spawn(
            self.superlink_command(), self.superlink_log, self._env(self.flwr_home, superlink=True),
            cwd=self.superlink_dir, append=True,
        )
        try:
            wait_for_port(self.port or 0, self.superlink_proc, self.startup_timeout, self.superlink_log)
            wait_for_health(
                self.port or 0, self.superlink_proc, self.startup_timeout, self.superlink_log,
                cafile=self.credentials.ca_cert if self.tls else None,
            )
        except LaunchError as e:
            raise LaunchError(f"SuperLink failed to start: {e}") from None

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and what it detached (SuperExec, ServerApp): a crash."""
        if self.superlink_proc is not None:
            kill_tree(self.superlink_proc, signal.SIGKILL)
            self.superlink_proc.wait()
        if self.port is not None:
            # The SuperExec and ServerApp it detached dial its Runtime API; SuperNodes
            # name the same address after --superlink and must be left alone.
            kill_using(f"--runtime-api-address {self.address}")

    def restart_superlink(self) -> None:
        """Kill the SuperLink (if running) and start it again on the same port and state.

        Running SuperNodes are left alone: they retry and carry on with the new
        SuperLink (the database keeps their registration).
        """
        self.kill_superlink()
        self.start_superlink()

    def register_key(self, public_key: Path) -> int:
        """``flwr supernode register <public_key>``; return the node ID Flower assigned."""
        try:
            return register_supernode(self.flwr_home, public_key, env=self._env(self.flwr_home))
        except LaunchError as e:
            raise LaunchError(f"{e}\nSuperLink log: {self.superlink_log}") from None

    def supernode_command(
        self, index: int, *, private_key: Path | None = None, port: int | None = None
    ) -> list[str]:
        """The ``flower-supernode`` command line of SuperNode ``index``.

        ``private_key`` overrides the node's key (e.g. an unregistered one).
        """
        args = [flower_bin("flower-supernode"), "--superlink", self.address]
        if self.tls:
            args += ["--root-certificates", str(self.credentials.ca_cert)]
        else:
            args.append("--insecure")
        key = private_key or (self.credentials.node_key(index) if self.auth else None)
        if key is not None:
            args += ["--auth-supernode-private-key", str(key)]
        args += [
            "--node-config", self.node_config(index),
            "--isolation", self.tuning.supernode_isolation,
            "--host", "127.0.0.1",
            "--port", str(port or self._node_port(index)),
        ]
        return args

    def start_supernode(
        self, index: int, *, private_key: Path | None = None, wait: bool = True
    ) -> SuperNodeProcess:
        """Start SuperNode ``index`` (same key, node config and Runtime API port as before).

        Parameters
        ----------
        index : int
            The silo, ``0 <= index < num_supernodes``.
        private_key : Path | None
            Authenticate with this key instead of the node's registered one.
        wait : bool
            Wait until the SuperLink accepted the node (its log shows the node ID);
            raise :class:`LaunchError` naming the log if it exits first.
        """
        if not 0 <= index < self.num_supernodes:
            raise ValueError(f"index must be in [0, {self.num_supernodes}), got {index}")
        running = self.supernodes.get(index)
        if running is not None and running.proc.poll() is None:
            raise LaunchError(f"SuperNode {index} is already running (PID {running.proc.pid})")
        silo_dir(self.state_root, index).mkdir(parents=True, exist_ok=True)
        home = FlowerDir(self.files.supernode_dir(index)).flwr_home
        home.mkdir(parents=True, exist_ok=True)
        log = self.supernode_log(index)
        offset = log.stat().st_size if log.exists() else 0
        port = self._node_port(index)
        env = self._env(home)
        args = self.supernode_command(index, private_key=private_key, port=port)
        proc = spawn(args, log, env, cwd=home.parent, append=True)
        node = SuperNodeProcess(index, proc, port, log, args, env, log_offset=offset)
        self.supernodes[index] = node
        if self.tuning.supernode_isolation == "process":
            # The ClientApp host writes to the SuperNode's log, where the ClientApps' output
            # goes with Flower's own isolation too; Flower's SuperExec keeps a log of its own.
            runner_log = log if self.tuning.persistent else self.files.superexec_log(index)
            node.superexec = spawn(
                self.task_runner_command(node.runtime_address), runner_log, env, cwd=home.parent, append=True,
            )
        if wait:
            self._wait_supernode(node)
        return node

    def task_runner_command(self, runtime_address: str) -> list[str]:
        """What takes a SuperNode's ClientApp tasks under ``--isolation process``.

        fedrec's persistent ClientApp host (:mod:`deployment.clientapp_host`) with the
        ``persistent`` tuning, else Flower's ``flower-superexec`` (a fresh
        ``flwr-clientapp`` per message). Both speak plain HTTP to the SuperNode's
        Runtime API, which listens on 127.0.0.1 only.
        """
        if self.tuning.persistent:
            return [
                sys.executable, "-m", "deployment.clientapp_host",
                "--runtime-api-address", runtime_address, *self.tuning.host_args(),
            ]
        return [flower_bin("flower-superexec"), "--insecure", "--runtime-api-address", runtime_address]

    def probe_supernode(
        self,
        *,
        private_key: Path | None = None,
        insecure: bool = False,
        name: str = "probe",
        timeout: float = 90.0,
    ) -> tuple[int, str]:
        """Run an extra SuperNode until it exits; return its exit code and log text.

        For tests of connections the SuperLink must refuse: a key that was never
        registered (``private_key``), or plain HTTP against the TLS port
        (``insecure=True``: ``--insecure``, no key, two connection retries). It uses
        partition 0's node config, its own port and ``logs/<name>.log``.

        Raises
        ------
        LaunchError
            If it is still running after ``timeout`` seconds (it was accepted).
        """
        args = self.supernode_command(0, private_key=private_key, port=free_port())
        if insecure:
            for flag in ("--root-certificates", "--auth-supernode-private-key"):
                if flag in args:
                    at = args.index(flag)
                    del args[at : at + 2]
            args[1:1] = ["--insecure", "--max-retries", "2", "--max-wait-time", "15"]
        home = FlowerDir(self.files.probe_dir(name)).flwr_home
        home.mkdir(parents=True, exist_ok=True)
        log = self.files.probe_log(name)
        # Output to a file, never a pipe: the SuperNode's SuperExec child holds a pipe
        # open until it sees its parent gone, and a zombie parent still "exists".
        proc = spawn(args, log, self._env(home), cwd=home.parent)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LaunchError(
                f"SuperNode {name} still runs after {timeout:.0f}s (it was accepted); see {log}"
            ) from None
        finally:
            kill_tree(proc, signal.SIGKILL)
            stop_detached(f"127.0.0.1:{args[args.index('--port') + 1]}")
        return code, log.read_text(errors="replace")

    def start_all_supernodes(self) -> None:
        """Start every SuperNode at once, then wait until all are connected."""
        for i in range(self.num_supernodes):
            self.start_supernode(i, wait=False)
        for i in range(self.num_supernodes):
            self._wait_supernode(self.supernodes[i])

    def kill_supernode(self, index: int) -> None:
        """SIGKILL SuperNode ``index`` and its SuperExec/ClientApp: a crash, no goodbye."""
        node = self.supernodes[index]
        self._lost_at[index] = time.monotonic()
        for proc in (node.proc, node.superexec):
            if proc is not None:
                kill_tree(proc, signal.SIGKILL)
                proc.wait()
        kill_using(node.runtime_address)

    def stop_supernode(self, index: int) -> None:
        """Stop SuperNode ``index`` gracefully (SIGTERM, SIGKILL after 10 s)."""
        node = self.supernodes[index]
        # A clean stop deactivates the node; if it could not (SuperLink gone, or the
        # SIGKILL after the grace period) the next start may need the retry window.
        self._lost_at[index] = time.monotonic()
        for proc in (node.proc, node.superexec):
            if proc is not None:
                stop(proc)
        stop_detached(node.runtime_address)

    def restart_supernode(self, index: int, *, kill: bool = True, wait: bool = True) -> SuperNodeProcess:
        """Kill (SIGKILL; ``kill=False``: SIGTERM) SuperNode ``index`` and start it again."""
        if index in self.supernodes:
            (self.kill_supernode if kill else self.stop_supernode)(index)
        return self.start_supernode(index, wait=wait)

    def run_app(
        self,
        run_config: Mapping[str, object] | None = None,
        *,
        app_dir: Path = REPO,
        on_line: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> int:
        """``flwr run <app_dir> fedrec --stream`` until the run ends; return its exit code.

        Blocking (:func:`deployment.launcher.flwr_run`); lines go to ``on_line``
        (default: printed) and are appended to ``logs/flwr-run.log``.
        """
        return flwr_run(
            self.flwr_home, app_dir=app_dir, run_config=run_config, env=self._env(self.flwr_home),
            log=self.files.flwr_run_log, on_line=on_line, timeout=timeout,
        )

    def start_app(
        self,
        run_config: Mapping[str, object] | None = None,
        *,
        app_dir: Path = REPO,
        on_line: Callable[[str], None] | None = None,
    ) -> AppRun:
        """Start ``flwr run <app_dir> fedrec --stream`` and return at once.

        :func:`deployment.launcher.start_flwr_run`: lines are appended to
        ``logs/flwr-run.log``, kept in :attr:`AppRun.lines` and passed to ``on_line``.
        """
        run = start_flwr_run(
            self.flwr_home, app_dir=app_dir, run_config=run_config, env=self._env(self.flwr_home),
            log=self.files.flwr_run_log, on_line=on_line,
        )
        self._apps.append(run)
        return run

    def stop_run(self, run_id: int) -> None:
        """``flwr stop <run_id>``: end a run on the SuperLink (its ServerApp stops)."""
        stop_flwr_run(self.flwr_home, run_id, env=self._env(self.flwr_home))

    def stop(self) -> None:
        """Stop everything we started: ``flwr run`` clients, SuperNodes, the SuperLink."""
        for app in self._apps:
            app.stop()
        for i in list(self.supernodes):
            self.stop_supernode(i)
        if self.superlink_proc is not None:
            stop(self.superlink_proc)
        if self.port is not None:
            stop_detached(self.address)

    def _node_port(self, index: int) -> int:
        if index not in self._node_ports:
            self._node_ports[index] = free_port()
        return self._node_ports[index]

    def _env(self, flwr_home: Path, *, superlink: bool = False) -> dict[str, str]:
        env = flower_env(flwr_home)
        for key in _LEGACY_GRPC_ENV:
            env.pop(key, None)
        tuning = self.tuning.env()
        if superlink:  # one ServerApp launch per run: the poll interval does not matter there
            tuning.pop("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", None)
        else:  # the user's own setting wins
            threads = self.tuning.thread_env(self.num_supernodes, os.cpu_count())
            tuning.update({k: v for k, v in threads.items() if k not in env})
        return {**env, **tuning}

    def _wait_supernode(self, node: SuperNodeProcess) -> None:
        """Wait until the node is connected (retrying a refused re-activation after a loss)."""
        node.wait_connected(self.startup_timeout, lost_at=self._lost_at.get(node.index))
        self._lost_at.pop(node.index, None)
