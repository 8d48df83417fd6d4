"""One ``flower-supernode`` we started: its node config, and waiting until it is connected."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from deployment.processes import LaunchError, spawn, tail

REACTIVATION_WINDOW = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 15.0
"""Seconds after a SuperNode went down during which the SuperLink may refuse its key.

The SuperLink holds a node "online" for ``HEARTBEAT_PATIENCE`` heartbeat intervals
after its last heartbeat; a restarted node with the same key is refused until then.
"""

_SUPERNODE_READY = "SuperNode ID:"
_ACTIVATION_REFUSED = "Failed to activate SuperNode"


def node_config(
    partition_id: int, num_partitions: int, *, data_root: Path | None, state_root: Path
) -> str:
    """The ``--node-config`` of silo ``partition_id``: its partition, data and state dirs.

    ``data-path`` is ``<data_root>/silo-<i>`` (the layout ``fedrec data prepare``
    writes), left out without ``data_root``; ``state-dir`` is ``<state_root>/silo-<i>``.
    """
    parts = [f"partition-id={partition_id}", f"num-partitions={num_partitions}"]
    if data_root is not None:
        parts.append(f"data-path={_quote(silo_dir(data_root, partition_id))}")
    parts.append(f"state-dir={_quote(silo_dir(state_root, partition_id))}")
    return " ".join(parts)


def silo_dir(root: Path, partition_id: int) -> Path:
    """``<root>/silo-<i>``: silo ``i``'s directory under a data root or a state root."""
    return root / f"silo-{partition_id}"


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

    def wait_connected(self, timeout: float, *, lost_at: float | None) -> None:
        """Wait until the node is connected; retry a refused re-activation after a loss.

        A SuperNode killed without saying goodbye stays "online" in the SuperLink until
        its heartbeat lapses (``HEARTBEAT_PATIENCE`` x 30 s in flwr 1.41), and the
        SuperLink refuses to activate the same key again until then ("Failed to
        activate SuperNode"); so within :data:`REACTIVATION_WINDOW` of ``lost_at``
        (a ``time.monotonic()`` value) the same command is started again.

        Raises
        ------
        LaunchError
            If it exits for another reason, or is not connected in time; names the log.
        """
        deadline = time.monotonic() + timeout
        retry_until = -1.0 if lost_at is None else lost_at + REACTIVATION_WINDOW
        while True:
            now = time.monotonic()
            if now >= max(deadline, retry_until):
                break
            with self.log.open("rb") as f:
                f.seek(self.log_offset)
                text = f.read()
            if _SUPERNODE_READY.encode() in text:
                return
            if self.proc.poll() is not None:
                if _ACTIVATION_REFUSED.encode() in text and now < retry_until:
                    time.sleep(3.0)
                    self.log_offset = self.log.stat().st_size
                    self.proc = spawn(
                        self.args, self.log, self.env, cwd=Path(self.env["FLWR_HOME"]).parent,
                        append=True,
                    )
                    continue
                raise LaunchError(
                    f"SuperNode {self.index} exited with code {self.proc.returncode} before "
                    f"connecting; see {self.log}:\n{tail(self.log, 15)}"
                )
            time.sleep(0.2)
        raise LaunchError(
            f"SuperNode {self.index} did not connect within {timeout:.0f}s; "
            f"see {self.log}:\n{tail(self.log, 15)}"
        )


def _quote(path: Path) -> str:
    text = str(path)
    if '"' in text or "'" in text:
        raise ValueError(f"paths in --node-config cannot contain quotes: {text}")
    return f'"{text}"'
