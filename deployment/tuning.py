"""Latency settings of the Flower processes a deployment starts."""

from __future__ import annotations

from dataclasses import dataclass

ISOLATIONS = ("subprocess", "process")
"""Flower's ``flower-supernode --isolation`` values."""

CLIENTAPP_MODES = ("per-message", "persistent")
"""How a SuperNode's messages are run (see :class:`Tuning`)."""


@dataclass(frozen=True, slots=True)
class Tuning:
    """Latency settings of the Flower processes (see ``benchmarks/deploy_rounds.py``).

    Parameters
    ----------
    superexec_poll_interval : float | None
        Seconds between polls of the SuperNode's Runtime API for a new ClientApp task:
        Flower's SuperExec reads ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (flwr 1.41+, not
        in its CLI help; ``None`` keeps its 1 s); fedrec's ClientApp host takes
        ``--poll`` (``None``: :data:`deployment.clientapp_host.DEFAULT_POLL`).
    supernode_isolation : str
        ``"subprocess"`` (Flower's default: the SuperNode starts its own SuperExec) or
        ``"process"`` (the SuperNode starts none: we start one beside it).
    clientapp : str
        ``"per-message"``: Flower's ``flwr-clientapp``, a fresh process per message
        (with ``"process"`` isolation we start a ``flower-superexec``).
        ``"persistent"``: fedrec's :mod:`deployment.clientapp_host` beside each
        SuperNode, one long-lived warm ClientApp process that runs every message
        (needs ``"process"`` isolation).
    share_cores : bool
        Give the ClientApps of the SuperNodes on this machine an even share of its cores:
        ``OMP_NUM_THREADS = max(1, cpus // SuperNodes)`` in the SuperNodes' environment
        (unless already set), which torch reads for its thread pool. Without it every
        ClientApp uses all cores, and several of them oversubscribe the machine.
    telemetry : bool
        Flower's anonymous usage telemetry (``FLWR_TELEMETRY_ENABLED``). Off in the
        tuned settings: every Flower process exit waits up to 4 s for it where DNS
        resolves but the internet is blocked, and a private federation has no reason
        to report to a third party.
    """

    superexec_poll_interval: float | None = None
    supernode_isolation: str = "subprocess"
    clientapp: str = "per-message"
    share_cores: bool = False
    telemetry: bool = True

    def __post_init__(self) -> None:
        poll = self.superexec_poll_interval
        if poll is not None and not 0.01 <= poll <= 60.0:
            raise ValueError(f"superexec_poll_interval must be in [0.01, 60] s, got {poll!r}")
        if self.supernode_isolation not in ISOLATIONS:
            raise ValueError(
                f"supernode_isolation must be 'subprocess' or 'process', "
                f"got {self.supernode_isolation!r}"
            )
        if self.clientapp not in CLIENTAPP_MODES:
            raise ValueError(f"clientapp must be 'per-message' or 'persistent', got {self.clientapp!r}")
        if self.clientapp == "persistent" and self.supernode_isolation != "process":
            raise ValueError(
                "clientapp='persistent' needs supernode_isolation='process' (the SuperNode "
                "must leave its ClientApp tasks to the process we start beside it)"
            )

    @property
    def persistent(self) -> bool:
        """Whether each SuperNode's messages run in fedrec's long-lived ClientApp host."""
        return self.clientapp == "persistent"

    def env(self) -> dict[str, str]:
        """Environment variables these settings need (empty for Flower's defaults)."""
        out: dict[str, str] = {}
        if self.superexec_poll_interval is not None and not self.persistent:
            out["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = f"{self.superexec_poll_interval:g}"
        if not self.telemetry:
            out["FLWR_TELEMETRY_ENABLED"] = "0"
        return out

    def thread_env(self, num_supernodes: int, cpus: int | None) -> dict[str, str]:
        """``OMP_NUM_THREADS`` for the ClientApps of ``num_supernodes`` on ``cpus`` cores (if sharing)."""
        if not self.share_cores:
            return {}
        return {"OMP_NUM_THREADS": str(max(1, (cpus or 1) // max(1, num_supernodes)))}

    def host_args(self) -> list[str]:
        """Options of ``python -m deployment.clientapp_host`` for these settings."""
        poll = self.superexec_poll_interval
        return [] if poll is None else ["--poll", f"{poll:g}"]

    def describe(self) -> str:
        """One line for the console: how messages run, the task poll, telemetry."""
        poll = self.superexec_poll_interval
        if self.persistent:
            from deployment.clientapp_host import DEFAULT_POLL

            runner = f"persistent ClientApp per SuperNode, task poll {DEFAULT_POLL if poll is None else poll:g} s"
        else:
            runner = f"flwr-clientapp per message, SuperExec poll {1.0 if poll is None else poll:g} s"
        cores = ", cores shared out (OMP_NUM_THREADS)" if self.share_cores else ""
        return f"{runner}{cores}, telemetry {'on' if self.telemetry else 'off'}"


FLOWER_DEFAULTS = Tuning()
"""Flower 1.42's behaviour: a fresh ``flwr-clientapp`` per message, SuperExec poll 1 s, telemetry on."""

TUNED = Tuning(supernode_isolation="process", clientapp="persistent", share_cores=True, telemetry=False)
"""fedrec's defaults for ``deploy local``: one persistent ClientApp process per SuperNode,
the cores shared out between the SuperNodes' ClientApps, telemetry off.

Its task poll is :data:`deployment.clientapp_host.DEFAULT_POLL` (0.1 s); the waits that
remain are Flower's (the SuperNode's 3 s idle poll and 0.5 s reply poll; see
docs/deployment.md, "Round time").
"""
