"""Deploy the app on one machine with real Flower processes: TLS, node auth, SuperNodes.

``fedrec deploy local`` (and the :class:`LocalDeployment` context manager behind it)
creates a CA, a server certificate and one ECDSA P-384 key pair per SuperNode, starts a
SuperLink with TLS and SuperNode authentication, registers each node's public key,
starts one ``flower-supernode`` per silo and runs the app with ``flwr run``. Every
process has a log file under the run directory and is stopped by PID.

Layout of a run directory::

    credentials/          ca.crt ca.key server.crt server.key supernode-<i>[.pub]
    superlink/            flwr-home/ (connection config, FABs)  superlink.db  run-config.toml
    supernodes/node-<i>/  flwr-home/ of SuperNode i
    silos/silo-<i>/       state-dir of silo i (default --state-root)
    logs/                 superlink.log  supernode-<i>.log  flwr-run.log
    metrics.jsonl report.md state.json ...   written by the ServerApp (run config run-dir)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import http.client
import ipaddress
import json
import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Self

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from simulations.launcher import (
    REPO,
    LaunchError,
    SuperLink,
    descendants,
    flower_bin,
    flower_env,
    flwr_run,
    free_port,
    processes_using,
    stop,
    stop_detached,
    tail,
    toml_value,
    wait_for_port,
)

CONNECTION = "fedrec"
"""Name of the SuperLink connection in ``$FLWR_HOME/config.toml``."""

SERVER_HOSTS = ("127.0.0.1", "localhost")
_SUPERNODE_READY = "SuperNode ID:"
_ACTIVATION_REFUSED = "Failed to activate SuperNode"
# The SuperLink holds a node "online" for HEARTBEAT_PATIENCE heartbeat intervals after
# its last heartbeat; a restarted node with the same key is refused until then.
_REACTIVATION_WINDOW = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 15.0
# Flower's legacy gRPC Fleet/Control servers open extra ports (9092/9093) only when
# these are "1"; the launcher removes them so the SuperLink listens on one port.
_LEGACY_GRPC_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


# ---------------------------------------------------------------- credentials
@dataclass(frozen=True, slots=True)
class Credentials:
    """Paths of the TLS and node-authentication files of one federation.

    Private keys (``ca.key``, ``server.key``, ``supernode-<i>``) are written with
    mode 0600. Node keys are OpenSSH-format ECDSA P-384 keys, the format
    ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
    accept (a PEM/PKCS#8 key is rejected).
    """

    directory: Path

    @property
    def ca_cert(self) -> Path:
        """CA certificate: SuperNodes and ``flwr`` trust the SuperLink through it."""
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        """CA private key: signs server certificates; keep it off the network."""
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        """SuperLink TLS certificate (SAN: the host names SuperNodes dial)."""
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        """SuperLink TLS private key."""
        return self.directory / "server.key"

    def node_key(self, index: int) -> Path:
        """Private key of SuperNode ``index`` (stays on the silo's host)."""
        return self.directory / f"supernode-{index}"

    def node_public_key(self, index: int) -> Path:
        """Public key of SuperNode ``index`` (registered on the SuperLink)."""
        return self.directory / f"supernode-{index}.pub"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only (0600), atomically enough."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its mode through os.open


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def create_ca(directory: Path, *, days: int = 365) -> Credentials:
    """Create a self-signed CA (ECDSA P-384) in ``directory`` unless it exists.

    Parameters
    ----------
    directory : Path
        Where ``ca.crt`` and ``ca.key`` go (created with mode 0700).
    days : int
        Validity of the CA certificate.

    Returns
    -------
    Credentials
        The paths of ``directory``.
    """
    creds = Credentials(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    if creds.ca_cert.exists() and creds.ca_key.exists():
        return creds
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec federation CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(
        creds.ca_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    creds.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return creds


def create_server_certificate(
    creds: Credentials, hosts: Sequence[str] = SERVER_HOSTS, *, days: int = 365
) -> Path:
    """Sign a SuperLink certificate for ``hosts`` (IP or DNS SANs) with the CA.

    An existing ``server.crt`` is replaced only if its SANs differ from ``hosts``.

    Parameters
    ----------
    creds : Credentials
        Holds the CA made by :func:`create_ca`.
    hosts : Sequence[str]
        Names and addresses SuperNodes and ``flwr`` use to reach the SuperLink;
        TLS verification fails for any other.
    days : int
        Validity of the certificate.

    Returns
    -------
    Path
        The server certificate.
    """
    if not hosts:
        raise ValueError("hosts must name at least one IP address or DNS name")
    sans = [_san(h) for h in hosts]
    if creds.server_cert.exists() and creds.server_key.exists():
        old = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
        old_sans = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if set(old_sans) == set(sans):
            return creds.server_cert
    ca_key = serialization.load_pem_private_key(creds.ca_key.read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{creds.ca_key} is not an EC key")
    ca_cert = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(
        creds.server_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    creds.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return creds.server_cert


def create_node_key(private_path: Path, comment: str = "") -> Path:
    """Create an ECDSA P-384 key pair in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384``.

    Parameters
    ----------
    private_path : Path
        The private key file (mode 0600); the public key goes to ``<path>.pub``.
        An existing pair is kept.
    comment : str
        Appended to the public key line (``ssh-keygen -C``).

    Returns
    -------
    Path
        The public key file.
    """
    public_path = private_path.with_name(private_path.name + ".pub")
    if private_path.exists() and public_path.exists():
        return public_path
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_path.write_bytes(line + (f" {comment}".encode() if comment else b"") + b"\n")
    return public_path


def create_credentials(
    directory: Path, num_nodes: int, hosts: Sequence[str] = SERVER_HOSTS
) -> Credentials:
    """CA, SuperLink certificate for ``hosts`` and ``num_nodes`` node key pairs.

    Files that already exist are kept (a restarted deployment keeps its identity).
    """
    creds = create_ca(directory)
    create_server_certificate(creds, hosts)
    for i in range(num_nodes):
        create_node_key(creds.node_key(i), comment=f"fedrec-supernode-{i}")
    return creds


# ---------------------------------------------------------------- tuning
@dataclass(frozen=True, slots=True)
class Tuning:
    """Latency settings of the Flower processes (see ``benchmark_latency.py``).

    Parameters
    ----------
    superexec_poll_interval : float | None
        Seconds between the SuperNode's SuperExec polls for a new ClientApp task
        (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, read by flwr 1.41's SuperExec; not in
        the CLI help). ``None`` keeps Flower's 1 s.
    supernode_isolation : str
        ``"subprocess"`` (Flower's default: the SuperNode starts its SuperExec) or
        ``"process"`` (we start one long-lived ``flower-superexec`` per SuperNode).
    telemetry : bool
        Flower's anonymous usage telemetry (``FLWR_TELEMETRY_ENABLED``). Off in the
        tuned settings: every Flower process exit waits up to 4 s for it where DNS
        resolves but the internet is blocked, and a private federation has no reason
        to report to a third party.
    """

    superexec_poll_interval: float | None = None
    supernode_isolation: str = "subprocess"
    telemetry: bool = True

    def __post_init__(self) -> None:
        poll = self.superexec_poll_interval
        if poll is not None and not 0.01 <= poll <= 60.0:
            raise ValueError(f"superexec_poll_interval must be in [0.01, 60] s, got {poll!r}")
        if self.supernode_isolation not in ("subprocess", "process"):
            raise ValueError(
                f"supernode_isolation must be 'subprocess' or 'process', "
                f"got {self.supernode_isolation!r}"
            )

    def env(self) -> dict[str, str]:
        """Environment variables these settings need (empty for Flower's defaults)."""
        out: dict[str, str] = {}
        if self.superexec_poll_interval is not None:
            out["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = f"{self.superexec_poll_interval:g}"
        if not self.telemetry:
            out["FLWR_TELEMETRY_ENABLED"] = "0"
        return out


FLOWER_DEFAULTS = Tuning()
"""Flower 1.41's behaviour: SuperExec polls every 1 s, telemetry on."""

TUNED = Tuning(telemetry=False)
"""fedrec's defaults for ``deploy local``: telemetry off, Flower's poll interval.

A 0.1 s SuperExec poll measured no gain on loopback (rounds wait on Flower's
hard-coded 3 s polls and on ClientApp start-up) and costs ~4 % of a core per idle
SuperNode, so it is left at Flower's 1 s; see docs/deployment.md.
"""


# ---------------------------------------------------------------- processes
@dataclass
class SuperNodeProcess:
    """One running ``flower-supernode`` we started (and its own SuperExec, if any)."""

    index: int
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    args: list[str]
    env: dict[str, str]
    log_offset: int = 0  # where this start's lines begin in the (appended) log
    superexec: subprocess.Popen[bytes] | None = None

    @property
    def runtime_address(self) -> str:
        """``host:port`` of its Runtime (ClientAppIo) API."""
        return f"127.0.0.1:{self.port}"


@dataclass
class AppRun:
    """A ``flwr run --stream`` started by :meth:`LocalDeployment.start_app`.

    Output lines go to the log file and to ``on_line`` from a reader thread;
    :attr:`run_id` is set once Flower prints it.
    """

    proc: subprocess.Popen[bytes]
    log: Path
    run_id: int | None = None
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for ``flwr run`` to exit (the run finished or failed); return its code."""
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def stop(self) -> None:
        """Stop the ``flwr run`` client (the run itself goes on in the SuperLink)."""
        stop(self.proc)
        if self._reader is not None:
            self._reader.join(5)


_RUN_ID = re.compile(r"Successfully started run (\d+)")


def _kill_tree(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to a process group we started and to its descendants."""
    if proc.poll() is not None:
        return
    tree = descendants([proc.pid])
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


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
        self.num_supernodes = num_supernodes
        self.tls = tls
        self.auth = auth
        self.tuning = tuning
        self.data_root = data_root.resolve() if data_root is not None else None
        self.state_root = (state_root or self.run_dir / "silos").resolve()
        self.start_supernodes_on_enter = start_supernodes
        self.startup_timeout = startup_timeout
        self.credentials = Credentials(self.run_dir / "credentials")
        self.log_dir = self.run_dir / "logs"
        self.superlink_dir = self.run_dir / "superlink"
        self.flwr_home = self.superlink_dir / "flwr-home"
        self.port: int | None = None
        self.superlink_proc: subprocess.Popen[bytes] | None = None
        self.supernodes: dict[int, SuperNodeProcess] = {}
        self.node_ids: dict[int, int] = {}
        self._apps: list[AppRun] = []
        self._node_ports: dict[int, int] = {}
        self._lost_at: dict[int, float] = {}  # when a SuperNode of ours last went down

    # -- context manager -------------------------------------------------
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

    # -- properties --------------------------------------------------------
    @property
    def address(self) -> str:
        """``127.0.0.1:<port>`` of the SuperLink (Fleet, Control and Runtime APIs)."""
        if self.port is None:
            raise LaunchError("the SuperLink has not been started")
        return f"127.0.0.1:{self.port}"

    @property
    def superlink_log(self) -> Path:
        """Log file of the SuperLink."""
        return self.log_dir / "superlink.log"

    def supernode_log(self, index: int) -> Path:
        """Log file of SuperNode ``index`` (appended to across restarts)."""
        return self.log_dir / f"supernode-{index}.log"

    @property
    def superlink(self) -> SuperLink:
        """The SuperLink as :mod:`simulations.launcher` describes it (for ``flwr_run``)."""
        if self.superlink_proc is None or self.port is None:
            raise LaunchError("the SuperLink has not been started")
        return SuperLink(self.superlink_proc, self.port, self.flwr_home, self.superlink_log)

    def node_config(self, index: int) -> str:
        """The ``--node-config`` string of SuperNode ``index``."""
        parts = [f"partition-id={index}", f"num-partitions={self.num_supernodes}"]
        if self.data_root is not None:
            parts.append(f"data-path={_quote(self.data_root / f'silo-{index}')}")
        parts.append(f"state-dir={_quote(self.state_root / f'silo-{index}')}")
        return " ".join(parts)

    # -- SuperLink ----------------------------------------------------------
    def start(self) -> None:
        """Create credentials (if missing), start the SuperLink, register node keys."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if self.tls:
            create_credentials(self.credentials.directory, self.num_supernodes)
        self.port = self.port or free_port()
        self._write_connection_config()
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
            "--database", str(self.superlink_dir / "superlink.db"),
        ]
        return args

    def start_superlink(self) -> None:
        """Start (or restart, on the same port and database) the SuperLink."""
        if self.superlink_proc is not None and self.superlink_proc.poll() is None:
            raise LaunchError(f"the SuperLink is already running (PID {self.superlink_proc.pid})")
        self.superlink_proc = self._spawn(
            self.superlink_command(), self.superlink_log, self._env(self.flwr_home, superlink=True),
            cwd=self.superlink_dir, append=True,
        )
        try:
            wait_for_port(self.port or 0, self.superlink_proc, self.startup_timeout, self.superlink_log)
            self._wait_superlink_health()
        except LaunchError as e:
            raise LaunchError(f"SuperLink failed to start: {e}") from None

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and what it detached (SuperExec, ServerApp): a crash."""
        if self.superlink_proc is not None:
            _kill_tree(self.superlink_proc, signal.SIGKILL)
            self.superlink_proc.wait()
        if self.port is not None:
            # The SuperExec and ServerApp it detached dial its Runtime API; SuperNodes
            # name the same address after --superlink and must be left alone.
            for pid in processes_using(f"--runtime-api-address {self.address}"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def restart_superlink(self) -> None:
        """Kill the SuperLink (if running) and start it again on the same port and state.

        Running SuperNodes are left alone: they retry and carry on with the new
        SuperLink (the database keeps their registration).
        """
        self.kill_superlink()
        self.start_superlink()

    def register_key(self, public_key: Path) -> int:
        """``flwr supernode register <public_key>``; return the node ID Flower assigned."""
        proc = subprocess.run(
            [flower_bin("flwr"), "supernode", "register", str(public_key), CONNECTION,
             "--format", "json"],
            check=False, capture_output=True, text=True, env=self._env(self.flwr_home), timeout=60,
        )
        try:
            reply = json.loads(proc.stdout[proc.stdout.find("{"):])
        except ValueError:
            reply = {}
        if proc.returncode != 0 or not reply.get("success"):
            raise LaunchError(
                f"flwr supernode register {public_key} failed (exit code {proc.returncode}):\n"
                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}\nSuperLink log: {self.superlink_log}"
            )
        return int(reply["node-id"])

    # -- SuperNodes -----------------------------------------------------------
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
        (self.state_root / f"silo-{index}").mkdir(parents=True, exist_ok=True)
        home = self.run_dir / "supernodes" / f"node-{index}" / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        log = self.supernode_log(index)
        offset = log.stat().st_size if log.exists() else 0
        port = self._node_port(index)
        env = self._env(home)
        args = self.supernode_command(index, private_key=private_key, port=port)
        proc = self._spawn(args, log, env, cwd=home.parent, append=True)
        node = SuperNodeProcess(index, proc, port, log, args, env, log_offset=offset)
        self.supernodes[index] = node
        if self.tuning.supernode_isolation == "process":
            node.superexec = self._spawn(
                [flower_bin("flower-superexec"), "--insecure",
                 "--runtime-api-address", node.runtime_address],
                self.log_dir / f"superexec-{index}.log", env, cwd=home.parent, append=True,
            )
        if wait:
            self._wait_supernode(node)
        return node

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
        home = self.run_dir / "supernodes" / name / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        # Output to a file, never a pipe: the SuperNode's SuperExec child holds a pipe
        # open until it sees its parent gone, and a zombie parent still "exists".
        proc = self._spawn(args, log, self._env(home), cwd=home.parent)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LaunchError(
                f"SuperNode {name} still runs after {timeout:.0f}s (it was accepted); see {log}"
            ) from None
        finally:
            _kill_tree(proc, signal.SIGKILL)
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
                _kill_tree(proc, signal.SIGKILL)
                proc.wait()
        for pid in processes_using(node.runtime_address):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

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

    # -- the app ------------------------------------------------------------------
    def run_app(
        self,
        run_config: Mapping[str, object] | None = None,
        *,
        app_dir: Path = REPO,
        on_line: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> int:
        """``flwr run <app_dir> fedrec --stream`` until the run ends; return its exit code.

        Blocking; lines go to ``on_line`` (default: printed) and to ``logs/flwr-run.log``.
        """
        log = self.log_dir / "flwr-run.log"
        with log.open("a") as out:

            def both(line: str) -> None:
                out.write(line)
                out.flush()
                if on_line is None:
                    sys.stdout.write(line)
                else:
                    on_line(line)

            return flwr_run(
                self.superlink, app_dir=app_dir, run_config=dict(run_config or {}),
                on_line=both, timeout=timeout,
            )

    def start_app(
        self,
        run_config: Mapping[str, object] | None = None,
        *,
        app_dir: Path = REPO,
        on_line: Callable[[str], None] | None = None,
    ) -> AppRun:
        """Start ``flwr run <app_dir> fedrec --stream`` and return at once.

        The run config goes in one TOML file (as :func:`launcher.flwr_run` does);
        lines are appended to ``logs/flwr-run.log`` and passed to ``on_line``.
        """
        args = [flower_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        if run_config:
            overrides = self.superlink_dir / "run-config.toml"
            overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
            args += ["--run-config", str(overrides)]
        log = self.log_dir / "flwr-run.log"
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self._env(self.flwr_home),
            start_new_session=True,
        )
        run = AppRun(proc, log)

        def read() -> None:
            assert proc.stdout is not None
            with log.open("a") as out:
                for raw in proc.stdout:
                    line = raw.decode(errors="replace")
                    out.write(line)
                    out.flush()
                    run.lines.append(line)
                    if run.run_id is None and (m := _RUN_ID.search(line)):
                        run.run_id = int(m.group(1))
                    if on_line is not None:
                        on_line(line)

        run._reader = threading.Thread(target=read, daemon=True)
        run._reader.start()
        self._apps.append(run)
        return run

    def stop_run(self, run_id: int) -> None:
        """``flwr stop <run_id>``: end a run on the SuperLink (its ServerApp stops)."""
        proc = subprocess.run(
            [flower_bin("flwr"), "stop", str(run_id), CONNECTION],
            check=False, capture_output=True, text=True, env=self._env(self.flwr_home), timeout=60,
        )
        if proc.returncode != 0:
            raise LaunchError(f"flwr stop {run_id} failed (exit code {proc.returncode}):\n{proc.stdout[-2000:]}")

    # -- shutdown -----------------------------------------------------------------
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

    # -- internals -----------------------------------------------------------------
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
        return {**env, **tuning}

    def _write_connection_config(self) -> None:
        security = (
            f'root-certificates = "{self.credentials.ca_cert}"' if self.tls else "insecure = true"
        )
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n{security}\n'
        )

    def _spawn(
        self, args: list[str], log: Path, env: dict[str, str], *, cwd: Path, append: bool = False
    ) -> subprocess.Popen[bytes]:
        with log.open("ab" if append else "wb") as out:
            out.write(f"$ {shlex.join(args)}\n".encode())
            out.flush()
            return subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                start_new_session=True,
            )

    def _wait_superlink_health(self) -> None:
        """Wait until *our* SuperLink answers ``GET /health`` (TLS verified with our CA).

        An open port alone is not enough: another process may hold it (a port picked
        by :func:`free_port` can be taken before the SuperLink binds it).
        """
        proc = self.superlink_proc
        assert proc is not None and self.port is not None
        context = (
            ssl.create_default_context(cafile=os.fspath(self.credentials.ca_cert)) if self.tls else None
        )
        deadline = time.monotonic() + self.startup_timeout
        last_error = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LaunchError(
                    f"process exited with code {proc.returncode}; see {self.superlink_log}:\n"
                    f"{tail(self.superlink_log, 15)}"
                )
            conn = (
                http.client.HTTPSConnection("127.0.0.1", self.port, timeout=5, context=context)
                if context is not None
                else http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
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
            f"no healthy SuperLink on {self.address} within {self.startup_timeout:.0f}s "
            f"(last error: {last_error or 'none'}); see {self.superlink_log}"
        )

    def _wait_supernode(self, node: SuperNodeProcess) -> None:
        """Wait until the node is connected; retry a refused re-activation after a kill.

        A SuperNode killed without saying goodbye stays "online" in the SuperLink until
        its heartbeat lapses (``HEARTBEAT_PATIENCE`` x 30 s in flwr 1.41), and the
        SuperLink refuses to activate the same key again until then ("Failed to
        activate SuperNode"); so within that window the start is retried.
        """
        deadline = time.monotonic() + self.startup_timeout
        lost_at = self._lost_at.get(node.index)
        retry_until = -1.0 if lost_at is None else lost_at + _REACTIVATION_WINDOW
        while True:
            now = time.monotonic()
            if now >= max(deadline, retry_until):
                break
            with node.log.open("rb") as f:
                f.seek(node.log_offset)
                text = f.read()
            if _SUPERNODE_READY.encode() in text:
                self._lost_at.pop(node.index, None)
                return
            if node.proc.poll() is not None:
                if _ACTIVATION_REFUSED.encode() in text and now < retry_until:
                    time.sleep(3.0)
                    node.log_offset = node.log.stat().st_size
                    node.proc = self._spawn(
                        node.args, node.log, node.env, cwd=Path(node.env["FLWR_HOME"]).parent,
                        append=True,
                    )
                    continue
                raise LaunchError(
                    f"SuperNode {node.index} exited with code {node.proc.returncode} before "
                    f"connecting; see {node.log}:\n{tail(node.log, 15)}"
                )
            time.sleep(0.2)
        raise LaunchError(
            f"SuperNode {node.index} did not connect within {self.startup_timeout:.0f}s; "
            f"see {node.log}:\n{tail(node.log, 15)}"
        )


def _quote(path: Path) -> str:
    text = str(path)
    if '"' in text or "'" in text:
        raise ValueError(f"paths in --node-config cannot contain quotes: {text}")
    return f'"{text}"'


# ---------------------------------------------------------------- multi-machine recipe
def multi_machine_commands(
    num_silos: int,
    *,
    superlink_host: str,
    port: int = 8000,
    run_overrides: Mapping[str, object] | None = None,
    tuning: Tuning = TUNED,
    tls: bool = True,
    auth: bool = True,
    data_root: str | None = None,
    state_root: str = "/srv/fedrec/state",
) -> str:
    """The commands that run the same federation on separate machines, as a shell recipe.

    One SuperLink host, one SuperNode per silo host, and a workstation with this
    repository that submits the run with ``flwr run``.
    """
    link = f"{superlink_host}:{port}"
    env = " ".join(f"{k}={v}" for k, v in tuning.env().items())
    env = f"{env} " if env else ""
    isolation = "" if tuning.supernode_isolation == "subprocess" else " --isolation process"
    out: list[str] = [
        f"# fedrec across machines: 1 SuperLink host, {num_silos} silo hosts, 1 workstation.",
        "# Every host: Python >= 3.11 with fedrec installed (pip install -e <this repo>), so the",
        "# apps' dependencies (torch, opacus, ...) are there: nothing is installed at run time.",
        f"# {superlink_host} is the name or IP address the silos and the workstation dial.",
        "",
    ]
    if tls:
        out += [
            "## 1. SuperLink host: a CA and the SuperLink's certificate (SAN = the host above)",
            f"fedrec deploy certs --out credentials --host {superlink_host}",
            "#   credentials/ca.crt       public: copy to every silo host and the workstation",
            "#   credentials/server.crt   public: the SuperLink's certificate",
            "#   credentials/server.key   private (0600): stays on the SuperLink host",
            "#   credentials/ca.key       private (0600): keep it offline; it can sign certificates",
            "#   (the certificate also names 127.0.0.1: the SuperLink's own SuperExec and ServerApp",
            "#    dial 127.0.0.1:<port> with TLS when it listens on 0.0.0.0)",
            "",
        ]
    if auth:
        out.append(
            "## 2. Each silo host: create the node's key pair; send only the .pub to the operator"
        )
        out += [f"fedrec deploy node-key supernode-{i}    # on silo host {i}" for i in range(num_silos)]
        out += [
            "#   supernode-<i>      private OpenSSH ECDSA P-384 key (0600): never leaves the silo",
            "#   supernode-<i>.pub  public key: goes to the SuperLink operator for registration",
            '#   (same as: ssh-keygen -t ecdsa -b 384 -N "" -f supernode-<i>)',
            "",
        ]
    superlink_args = (
        ["--ssl-ca-certfile", "credentials/ca.crt", "--ssl-certfile", "credentials/server.crt",
         "--ssl-keyfile", "credentials/server.key"]
        if tls else ["--insecure"]
    )
    if auth:
        superlink_args.append("--enable-supernode-auth")
    superlink_args += ["--host", "0.0.0.0", "--port", str(port),
                       "--disable-runtime-dependency-installation", "--database", "superlink.db"]
    out += [
        "## 3. SuperLink host: start the SuperLink (Fleet, Control and Runtime APIs on one port)",
        shlex.join(["flower-superlink", *superlink_args]),
        f"#   open TCP {port} to the silo hosts and the workstation; results (run-dir) land here.",
        "",
        "## 4. Workstation (a checkout of this repo, ca.crt copied from the SuperLink host):",
        "#    a Flower home of its own with the connection (keep this FLWR_HOME for step 6)",
        'export FLWR_HOME="$PWD/flwr-home" && mkdir -p "$FLWR_HOME"',
        'cat > "$FLWR_HOME/config.toml" <<EOF',
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{link}"',
        'root-certificates = "$PWD/ca.crt"' if tls else "insecure = true",
        "EOF",
    ]
    if auth:
        out.append("#    register each silo's public key (the node ID it prints is the silo's identity)")
        out += [f"flwr supernode register supernode-{i}.pub {CONNECTION}" for i in range(num_silos)]
    out += ["", "## 5. Silo host i: start its SuperNode (one per silo)"]
    for i in range(num_silos):
        node_config = f"partition-id={i} num-partitions={num_silos}"
        if data_root is not None:
            node_config += f' data-path="{data_root}/silo-{i}"'
        node_config += f' state-dir="{state_root}/silo-{i}"'
        args = ["flower-supernode", "--superlink", link]
        args += ["--root-certificates", "ca.crt"] if tls else ["--insecure"]
        if auth:
            args += ["--auth-supernode-private-key", f"supernode-{i}"]
        args += ["--node-config", node_config]
        out.append(f"{env}{shlex.join(args)}{isolation} --host 127.0.0.1 --port 9094   # silo {i}")
        if isolation:
            out.append(
                f"{env}flower-superexec --insecure --runtime-api-address 127.0.0.1:9094   # silo {i}"
            )
    out += ["", "## 6. Workstation: run the app (run-dir is a path on the SuperLink host)"]
    overrides = dict(run_overrides or {})
    if overrides:
        out.append("cat > run-config.toml <<EOF")
        out += [f"{k} = {toml_value(v)}" for k, v in overrides.items()]
        out += ["EOF", f"flwr run . {CONNECTION} --stream --run-config run-config.toml"]
    else:
        out.append(f"flwr run . {CONNECTION} --stream")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- CLI
deploy_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run the app on real Flower processes (SuperLink + SuperNodes) with TLS and node auth.",
)

_ConfigOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--config", "-c", help="Override: -c train.lr=0.005, or a TOML file of overrides (repeatable)."
    ),
]


@deploy_app.command()
def local(
    silos: Annotated[int, typer.Option(min=1, help="Number of SuperNodes (one per silo).")] = 3,
    tls: Annotated[bool, typer.Option("--tls/--insecure", help="TLS on the SuperLink.")] = True,
    auth: Annotated[
        bool, typer.Option("--auth/--no-auth", help="SuperNode authentication (needs TLS).")
    ] = True,
    rounds: Annotated[int | None, typer.Option(help="num-server-rounds.")] = None,
    config: _ConfigOpt = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Where to write the run (default runs/<time>-deploy).")
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(help="Per-silo data: SuperNode i gets data-path=<data-root>/silo-<i>."),
    ] = None,
    state_root: Annotated[
        Path | None,
        typer.Option(help="SuperNode i gets state-dir=<state-root>/silo-<i> (default <run-dir>/silos)."),
    ] = None,
    print_commands: Annotated[
        bool, typer.Option("--print-commands", help="Print the multi-machine commands instead of starting anything.")
    ] = False,
    superlink_host: Annotated[
        str, typer.Option(help="--print-commands: the SuperLink's name or IP address.")
    ] = "SUPERLINK_HOST",
    flower_defaults: Annotated[
        bool, typer.Option("--flower-defaults", help="Flower's latency settings instead of fedrec's tuned ones.")
    ] = False,
    superexec_poll: Annotated[
        float | None,
        typer.Option(
            min=0.01, max=60.0,
            help="Seconds between SuperExec polls for ClientApp tasks (Flower's default: 1).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's full log stream.")] = False,
) -> None:
    """Start a SuperLink and one SuperNode per silo on 127.0.0.1, run the app, stop all."""
    from common.config import load_default_run_config
    from common.errors import ConfigError, FedrecError
    from server.reporting import default_run_dir
    from simulations import cli

    tuning = FLOWER_DEFAULTS if flower_defaults else TUNED
    if superexec_poll is not None:
        tuning = dataclasses.replace(tuning, superexec_poll_interval=superexec_poll)
    try:
        if auth and not tls:
            raise ConfigError("SuperNode authentication needs TLS: drop --insecure or add --no-auth")
        run_config, cfg = cli.resolve_config(config, **{"num-server-rounds": rounds})
        if data_root is not None:
            missing = [i for i in range(silos) if not (data_root / f"silo-{i}").is_dir()]
            if missing:
                raise ConfigError(
                    f"{data_root}/silo-{missing[0]} does not exist: prepare the silos' data "
                    f"first (fedrec data prepare --out {data_root} ...)"
                )
            if silos < cfg.strategy.min_nodes:
                raise ConfigError(f"strategy.min-nodes is {cfg.strategy.min_nodes} but only {silos} silos run")
        else:
            cli.preflight(cfg, silos)
    except FedrecError as e:
        cli._fail(e)
    if print_commands:
        defaults = load_default_run_config()
        overrides = {k: v for k, v in run_config.items() if defaults.get(k) != v}
        overrides.setdefault("run-dir", "/srv/fedrec/runs/deploy")
        sys.stdout.write(
            multi_machine_commands(
                silos, superlink_host=superlink_host, run_overrides=overrides, tuning=tuning,
                tls=tls, auth=auth, data_root=str(data_root.resolve()) if data_root else None,
                state_root=str(state_root.resolve()) if state_root else "/srv/fedrec/state",
            )
        )
        return
    out = run_dir.resolve() if run_dir is not None else default_run_dir("deploy").resolve()
    if (out / "metrics.jsonl").exists():
        cli._fail(ConfigError(f"{out} already holds a run (metrics.jsonl exists); choose another --run-dir"))
    run_config["run-dir"] = str(out)
    out.mkdir(parents=True, exist_ok=True)
    cli.console.print(
        f"[bold]fedrec deploy local[/]: {silos} SuperNodes, {cfg.num_server_rounds} rounds, "
        f"TLS {'on' if tls else 'off'}, node auth {'on' if auth else 'off'}, "
        f"{'Flower default' if flower_defaults else 'fedrec'} latency settings ({_describe(tuning)})"
    )
    cli.console.print(f"run directory: {out}")
    signal.signal(signal.SIGTERM, cli._raise_keyboard_interrupt)
    dep = LocalDeployment(out, silos, tls=tls, auth=auth, tuning=tuning, data_root=data_root,
                          state_root=state_root, start_supernodes=False)
    try:
        with dep:
            cli.console.print(f"SuperLink {dep.address} (log {dep.superlink_log})")
            if dep.node_ids:
                cli.console.print(f"registered node keys: {len(dep.node_ids)} in {dep.credentials.directory}")
            dep.start_all_supernodes()
            for i, node in sorted(dep.supernodes.items()):
                cli.console.print(f"SuperNode {i}: PID {node.proc.pid}, log {node.log}")

            def show(line: str) -> None:
                if verbose or cli._PROGRESS.search(line):
                    sys.stdout.write(line)
                    sys.stdout.flush()

            rc = dep.run_app(run_config, on_line=show)
    except LaunchError as e:
        cli.err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        cli.err.print(f"[bold yellow]interrupted[/]: every process stopped; logs in {dep.log_dir}")
        raise typer.Exit(130) from None
    _summarise(out, rc, cfg.num_server_rounds, cfg.eval.k, cfg.privacy.mode, dep.log_dir)


def _describe(tuning: Tuning) -> str:
    poll = tuning.superexec_poll_interval
    return (
        f"SuperExec poll {'1' if poll is None else f'{poll:g}'} s, "
        f"telemetry {'on' if tuning.telemetry else 'off'}"
    )


def _summarise(out: Path, rc: int, num_rounds: int, k: int, privacy_mode: str, log_dir: Path) -> None:
    """Check the run's files and print its tables, as ``fedrec simulate`` does."""
    from simulations import cli

    metrics_file = out / "metrics.jsonl"
    flwr_log = log_dir / "flwr-run.log"
    if rc != 0 or not metrics_file.exists():
        cli.err.print(f"[bold red]error:[/] the Flower run failed (exit code {rc}); logs: {flwr_log}, {log_dir}")
        raise typer.Exit(1)
    rounds_done = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    state_file = out / "state.json"
    stop_reason = json.loads(state_file.read_text()).get("stop-reason") if state_file.exists() else None
    if len(rounds_done) < num_rounds and not stop_reason:
        cli.err.print(
            f"[bold red]error:[/] only {len(rounds_done)} of {num_rounds} rounds completed; "
            f"logs: {flwr_log}, {log_dir}"
        )
        raise typer.Exit(1)
    cli._print_rounds(rounds_done, k)
    if privacy_mode != "none":
        cli._print_privacy(rounds_done)
    if stop_reason:
        cli.console.print(f"[bold yellow]stopped after round {len(rounds_done)}:[/] {stop_reason}")
    cli.console.print(f"report: {out / 'report.md'}")


@deploy_app.command()
def certs(
    out: Annotated[Path, typer.Option(help="Directory for ca.crt/ca.key/server.crt/server.key.")],
    host: Annotated[
        list[str], typer.Option(help="SuperLink host name or IP address (repeatable).")
    ] = list(SERVER_HOSTS),  # noqa: B006 - typer needs a literal default
) -> None:
    """Create a CA and a SuperLink certificate for HOST (kept if they already exist)."""
    # 127.0.0.1 always: a SuperLink bound to 0.0.0.0 has its SuperExec and ServerApp dial
    # 127.0.0.1:<port> over TLS, which fails unless the certificate names that address.
    hosts = list(dict.fromkeys([*host, *SERVER_HOSTS]))
    creds = create_ca(out)
    create_server_certificate(creds, hosts)
    typer.echo(f"CA: {creds.ca_cert} (private key {creds.ca_key})")
    typer.echo(f"SuperLink: {creds.server_cert} (private key {creds.server_key}), SAN {', '.join(hosts)}")


@deploy_app.command("node-key")
def node_key(
    path: Annotated[Path, typer.Argument(help="Private key file; the public key goes to PATH.pub.")],
) -> None:
    """Create a SuperNode's ECDSA P-384 key pair (OpenSSH format), as ssh-keygen would."""
    public = create_node_key(path, comment=path.name)
    typer.echo(f"private key: {path} (0600; keep it on this host)")
    typer.echo(f"public key:  {public} (register it: flwr supernode register {public} <connection>)")
