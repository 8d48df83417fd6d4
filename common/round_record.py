"""What happened in one round: one line of ``metrics.jsonl``, and its parts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from common.privacy.events import PrivacyRelease


@dataclass(frozen=True, slots=True)
class CentralCounts:
    """What the server counted in a central-DP round."""

    sampled: int  # silos Poisson-sampled
    aggregated: int  # valid updates aggregated
    clipped: int  # updates whose norm exceeded the clip bound


@dataclass(frozen=True, slots=True)
class SiloRoundStats:
    """The anomaly report of one silo's training reply in one round."""

    node: int
    partition_id: int | None  # as the reply claims it
    weight_claimed: float | None
    weight_used: float | None  # after the cap of its registered weight
    norm: float | None  # L2 norm of its update of the shared model, as received
    cosine: float | None  # cosine of its update with the round's aggregate update
    clipped: bool  # its update was scaled down to the norm bound
    outlier: bool  # its norm exceeded the bound, or it pointed against the aggregate
    rejected: str | None  # why it was not aggregated

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {
            "node": self.node,
            "partition-id": self.partition_id,
            "weight-claimed": self.weight_claimed,
            "weight-used": self.weight_used,
            "norm": self.norm,
            "cosine": self.cosine,
            "clipped": self.clipped,
            "outlier": self.outlier,
            "rejected": self.rejected,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SiloRoundStats:
        """Inverse of :meth:`to_json`."""
        return cls(
            node=int(data["node"]),
            partition_id=None if data["partition-id"] is None else int(data["partition-id"]),
            weight_claimed=data["weight-claimed"],
            weight_used=data["weight-used"],
            norm=data["norm"],
            cosine=data["cosine"],
            clipped=bool(data["clipped"]),
            outlier=bool(data["outlier"]),
            rejected=data["rejected"],
        )


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """What happened in one round: one line of ``metrics.jsonl``."""

    server_round: int
    seconds: float
    train: Mapping[str, float]
    evaluate: Mapping[str, float]
    bytes_sent: int
    bytes_received: int
    missing_nodes: tuple[int, ...]
    rejected: tuple[tuple[int, str], ...]  # (node id, reason)
    privacy: tuple[PrivacyRelease, ...] = ()  # the silos' local-DP releases
    central: PrivacyRelease | None = None  # the server's central-DP release
    central_counts: CentralCounts | None = None
    silos: tuple[SiloRoundStats, ...] = ()  # the anomaly report of the round's training replies

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (NaN becomes null)."""
        return {
            "round": self.server_round,
            "seconds": round(self.seconds, 4),
            "train": _clean(self.train),
            "evaluate": _clean(self.evaluate),
            "bytes-sent": self.bytes_sent,
            "bytes-received": self.bytes_received,
            "missing-nodes": list(self.missing_nodes),
            "rejected": [{"node": n, "reason": r} for n, r in self.rejected],
            "privacy": [e.to_json() for e in self.privacy],
            "central-privacy": None if self.central is None else self.central.to_json(),
            "central-counts": None if self.central_counts is None else asdict(self.central_counts),
            "silos": [s.to_json() for s in self.silos],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRecord:
        """Inverse of :meth:`to_json` (null metrics become NaN).

        Raises
        ------
        KeyError, TypeError, ValueError
            On a line that is not a round record (callers name the file and line).
        """
        central = data.get("central-privacy")
        counts = data.get("central-counts")
        return cls(
            server_round=int(data["round"]),
            seconds=float(data["seconds"]),
            train=_floats(data["train"]),
            evaluate=_floats(data["evaluate"]),
            bytes_sent=int(data["bytes-sent"]),
            bytes_received=int(data["bytes-received"]),
            missing_nodes=tuple(int(n) for n in data["missing-nodes"]),
            rejected=tuple((int(r["node"]), str(r["reason"])) for r in data["rejected"]),
            privacy=tuple(PrivacyRelease.from_json(e) for e in data["privacy"]),
            central=None if central is None else PrivacyRelease.from_json(central),
            central_counts=None if counts is None else CentralCounts(**counts),
            silos=tuple(SiloRoundStats.from_json(s) for s in data.get("silos", [])),
        )


def _clean(values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and math.isnan(v) else v)
        for k, v in values.items()
        if not isinstance(v, list)
    }


def _floats(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: math.nan if v is None else float(v) for k, v in values.items()}
