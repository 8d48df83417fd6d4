"""Latency settings of the Flower processes a deployment starts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tuning:
    """Latency settings of the Flower processes (see ``benchmarks/latency.py``).

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
