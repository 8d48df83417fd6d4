"""The run directory: its layout (every file name) and typed readers.

One run writes one directory; the server's recorder writes it, and resume, the
audit, the CLI and the deployment launcher read it through :class:`RunDir`. No
other module spells a run-directory file name.

::

    config.json             resolved run config, run uid, library versions
    metrics.jsonl           one line per completed round (the commit point)
    state.json              last completed round, finished?, stop reason, ledger anchor
    initial.npz final.npz   shared model before round 1 / after the last round
    checkpoints/round-NNNN.npz
    ledger/server.jsonl ledger/silo-<k>.jsonl
    central-canaries.json   canary clients' cosines (central-DP one-shot audit)
    report.md metrics.png privacy.png
    audit.json audit.md audit-epsilon-rounds.png audit-epsilon-delta.png
    simulation.json flower.log flower/ resume-overrides.toml   (fedrec simulate)
    silos/silo-<k>/         silos' durable state in a simulation
    logs/ deployment/       (fedrec deploy local)
    credentials/ superlink/ supernodes/node-<k>/ logs/<process>.log   (fedrec deploy local)
    summary.json            (fedrec centralized)
    fedrec.lock             held by the fedrec command writing here (its pid)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.errors import FedrecError
from common.privacy.events import ReleaseError
from common.round_record import RoundRecord

_SILO_LEDGER = re.compile(r"silo-(\d+)\.jsonl")


class RunDirError(FedrecError):
    """A run directory is missing a file, or a file is unreadable."""


def default_run_dir(label: str) -> Path:
    """``runs/<UTC time>-<label>`` under the working directory."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path.cwd() / "runs" / f"{stamp}-{label}"


@dataclass(frozen=True, slots=True)
class RunState:
    """``state.json``: how far the run got."""

    last_completed_round: int
    finished: bool
    stop_reason: str | None
    ledger_anchor: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class SavedConfig:
    """``config.json``: the run config a run was started with."""

    run_config: dict[str, Any]
    run_uid: str
    versions: dict[str, str]


@dataclass(frozen=True, slots=True)
class RunDir:
    """Paths and readers of one run directory."""

    path: Path

    # ------------------------------------------------------------ layout
    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def state(self) -> Path:
        return self.path / "state.json"

    @property
    def initial_model(self) -> Path:
        return self.path / "initial.npz"

    @property
    def final_model(self) -> Path:
        return self.path / "final.npz"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, server_round: int) -> Path:
        """The shared model after ``server_round`` (round 0 = the initial model)."""
        if server_round == 0:
            return self.initial_model
        return self.checkpoints / f"round-{server_round:04d}.npz"

    @property
    def ledger_dir(self) -> Path:
        return self.path / "ledger"

    @property
    def server_ledger(self) -> Path:
        return self.ledger_dir / "server.jsonl"

    def silo_ledger(self, partition_id: int) -> Path:
        return self.ledger_dir / f"silo-{partition_id}.jsonl"

    def silo_ledgers(self) -> Iterator[tuple[int, Path]]:
        """``(partition id, path)`` of every silo ledger present, by partition id."""
        if not self.ledger_dir.is_dir():
            return
        found = []
        for path in self.ledger_dir.iterdir():
            match = _SILO_LEDGER.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), path))
        yield from sorted(found)

    @property
    def central_canaries(self) -> Path:
        return self.path / "central-canaries.json"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def metrics_plot(self) -> Path:
        return self.path / "metrics.png"

    @property
    def privacy_plot(self) -> Path:
        return self.path / "privacy.png"

    @property
    def audit_json(self) -> Path:
        return self.path / "audit.json"

    @property
    def audit_report(self) -> Path:
        return self.path / "audit.md"

    @property
    def audit_rounds_plot(self) -> Path:
        return self.path / "audit-epsilon-rounds.png"

    @property
    def audit_delta_plot(self) -> Path:
        return self.path / "audit-epsilon-delta.png"

    @property
    def simulation(self) -> Path:
        """``fedrec simulate``'s launch facts (number of clients)."""
        return self.path / "simulation.json"

    @property
    def flower_log(self) -> Path:
        return self.path / "flower.log"

    @property
    def flower_dir(self) -> Path:
        """The private SuperLink's working directory of a simulation."""
        return self.path / "flower"

    @property
    def resume_overrides(self) -> Path:
        return self.path / "resume-overrides.toml"

    @property
    def silo_states(self) -> Path:
        """Silos' durable state in a simulation (``state-root``)."""
        return self.path / "silos"

    @property
    def logs(self) -> Path:
        """Process logs of a local deployment."""
        return self.path / "logs"

    @property
    def deployment(self) -> Path:
        """Credentials and SuperLink files of a local deployment."""
        return self.path / "deployment"

    @property
    def credentials(self) -> Path:
        """A local deployment's CA, SuperLink certificate and SuperNode keys."""
        return self.path / "credentials"

    @property
    def superlink_dir(self) -> Path:
        """A local deployment's SuperLink working directory (Flower home, database)."""
        return self.path / "superlink"

    def supernode_dir(self, index: int) -> Path:
        """Working directory (Flower home) of a local deployment's SuperNode ``index``."""
        return self.path / "supernodes" / f"node-{index}"

    def probe_dir(self, name: str) -> Path:
        """Working directory of an extra SuperNode started to probe the SuperLink."""
        return self.path / "supernodes" / name

    @property
    def superlink_log(self) -> Path:
        return self.logs / "superlink.log"

    def supernode_log(self, index: int) -> Path:
        """Log of SuperNode ``index``, appended to across restarts."""
        return self.logs / f"supernode-{index}.log"

    def superexec_log(self, index: int) -> Path:
        """Log of the SuperExec started beside SuperNode ``index`` (process isolation)."""
        return self.logs / f"superexec-{index}.log"

    @property
    def flwr_run_log(self) -> Path:
        """Output of every ``flwr run`` of a local deployment, appended."""
        return self.logs / "flwr-run.log"

    def probe_log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    @property
    def summary(self) -> Path:
        """``fedrec centralized``: the best validation epoch's metrics."""
        return self.path / "summary.json"

    @property
    def lock(self) -> Path:
        """Held (``flock``) by the fedrec command running in this directory; holds its pid."""
        return self.path / "fedrec.lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this directory's exclusive lock (creating the directory) while inside.

        One fedrec command at a time writes a run directory: a second ``simulate``,
        ``deploy local`` or ``centralized`` on it fails at once instead of sharing its
        SuperLink database and files. The lock is an ``flock`` on :attr:`lock`, so the
        kernel releases it when the holder exits, even by SIGKILL; the file stays.

        Raises
        ------
        RunDirError
            If another process holds the lock (naming its pid), or the directory or
            lock file cannot be created (naming the path and the system's reason).
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"{exc.filename or self.path}: cannot write ({exc.strerror})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise RunDirError(f"{self.path} is in use by another fedrec process (pid {holder})") from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as exc:
                raise RunDirError(f"{self.lock}: cannot write ({exc.strerror})") from None
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------ readers
    def holds_run(self) -> bool:
        """Whether a run already wrote rounds here (nothing may overwrite them)."""
        return self.metrics.exists()

    def read_config(self) -> SavedConfig:
        """``config.json``.

        Raises
        ------
        RunDirError
            If it is missing or unreadable, naming the file.
        """
        data = _read_json(self.config, f"{self.path} holds no fedrec run")
        try:
            return SavedConfig(dict(data["run-config"]), str(data["run-uid"]), dict(data.get("versions", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise RunDirError(f"{self.config}: not a fedrec run config (missing {exc})") from None

    def read_rounds(self) -> list[RoundRecord]:
        """Every round of ``metrics.jsonl`` ([] when the run completed no round).

        Raises
        ------
        RunDirError
            On an incomplete last line (an interrupted write) or a line that is not JSON.
        """
        if not self.metrics.exists():
            return []
        text = _read_text(self.metrics)
        if text and not text.endswith("\n"):
            raise RunDirError(f"{self.metrics} ends in an incomplete line (interrupted write); inspect it")
        rounds = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                rounds.append(RoundRecord.from_json(json.loads(line)))
            except json.JSONDecodeError:
                raise RunDirError(f"{self.metrics}, line {number}: not valid JSON") from None
            except (KeyError, TypeError, ValueError, ReleaseError) as exc:
                raise RunDirError(f"{self.metrics}, line {number}: not a round record ({exc!r})") from None
        return rounds

    def read_state(self) -> RunState | None:
        """``state.json``, or None before the first round completed."""
        if not self.state.exists():
            return None
        data = _read_json(self.state, "")
        return RunState(
            last_completed_round=int(data.get("last-completed-round", 0)),
            finished=bool(data.get("finished", False)),
            stop_reason=data.get("stop-reason"),
            ledger_anchor=data.get("ledger"),
        )

    def read_simulation_clients(self) -> int | None:
        """Number of clients ``fedrec simulate`` ran (None if it did not write it)."""
        if not self.simulation.exists():
            return None
        clients = _read_json(self.simulation, "").get("clients")
        return int(clients) if clients is not None else None

    def read_central_canaries(self) -> dict[str, Any] | None:
        """The canary clients' cosines, or None when the run had none."""
        if not self.central_canaries.exists():
            return None
        return _read_json(self.central_canaries, "")


@dataclass(frozen=True, slots=True)
class FlowerDir:
    """Working directory of one Flower process fedrec starts, inside a run directory.

    :attr:`RunDir.flower_dir` (a simulation's SuperLink), :attr:`RunDir.superlink_dir`
    and :meth:`RunDir.supernode_dir` (a local deployment) have this layout.
    """

    path: Path

    @property
    def flwr_home(self) -> Path:
        """``FLWR_HOME``: the connection config, installed app bundles."""
        return self.path / "flwr-home"

    @property
    def database(self) -> Path:
        """A SuperLink's state (registered nodes, runs, messages); survives a restart."""
        return self.path / "superlink.db"

    @property
    def run_config(self) -> Path:
        """The run config passed to ``flwr run --run-config``."""
        return self.path / "run-config.toml"

    @property
    def superlink_log(self) -> Path:
        """Log of a simulation's SuperLink."""
        return self.path / "superlink.log"


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise RunDirError(f"{path}: cannot read ({exc.strerror})") from None


def _read_json(path: Path, missing_hint: str) -> dict[str, Any]:
    if not path.exists():
        hint = f": {missing_hint}" if missing_hint else ""
        raise RunDirError(f"{path} not found{hint}")
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a JSON object")
    return data
