"""Secure aggregation (SecAgg+) for fedrec: quantisation, protocol state machines, config checks.

Pure: no Flower runtime (Flower's crypto primitives only). The drivers that carry the
stages in Flower messages are :mod:`server.secagg` and :mod:`client.secagg`; the
protocol, its parameters and its threat model are in ``docs/secure-aggregation.md``.
"""

from __future__ import annotations

from typing import Any

from common.errors import ConfigError

DROPOUT_EVENT = "secure-sum-dropout"
"""Kind of the server-ledger event naming the silos missing from a released secure sum and what its
noise still guarantees (:func:`server.secagg.dropout_event`); not a release: replays skip it."""

ABORT_EVENT = "secure-sum-aborted"
"""Kind of the server-ledger event for a secure sum that did not complete (fewer silos than its
threshold, or the protocol failed): which release it was for, who had staged, why; nothing was
released, so no ε is spent; not a release: replays skip it."""


def check_compatible(settings: Any, *, secure_aggregation: bool | None = None) -> None:
    """Refuse a config that combines secure aggregation with anything that reads single silos' updates.

    Under secure aggregation the server only ever sees the sum of the silos' masked
    vectors, so nothing on the server can look at one silo's update: robust
    aggregators (median, trimmed mean, Krum), per-update norm checks, the
    opposed-update rejection and the server's client-level central DP (which clips each
    silo's update) would silently see nothing and protect nothing. Contributions are
    bounded instead by per-user clipping inside each honest silo.

    ``settings`` is a :class:`common.config.AppConfig` (read: ``privacy.mode``,
    ``strategy.aggregator``, ``strategy.norm_action``, ``strategy.reject_opposed``);
    ``secure_aggregation`` defaults to ``settings.privacy.mode == "distributed"``.

    Raises
    ------
    ConfigError
        Naming every conflicting key and the value it must take.
    """
    secure = settings.privacy.mode == "distributed" if secure_aggregation is None else secure_aggregation
    if not secure:
        return
    s, p = settings.strategy, settings.privacy
    conflicts = []
    if s.aggregator != "fedavg":
        conflicts.append(f'strategy.aggregator = "fedavg" (got {s.aggregator!r}: it needs each silo\'s update)')
    if s.norm_action != "none":
        conflicts.append(f'strategy.norm-action = "none" (got {s.norm_action!r}: it reads each update\'s norm)')
    if s.reject_opposed:
        conflicts.append("strategy.reject-opposed = false (it compares single silos' updates)")
    if p.mode in ("central", "local+central"):
        conflicts.append(f"privacy.mode without central DP (got {p.mode!r}: it clips each silo's update)")
    if conflicts:
        raise ConfigError(
            "secure aggregation shows the server only the sum of the silos' updates, so defences that inspect "
            "individual updates cannot run; set " + "; ".join(conflicts)
        )
