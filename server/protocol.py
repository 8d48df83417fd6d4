"""The small interface between the round loop and a fedrec strategy, and a round's events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common.privacy.events import PrivacyRelease
from common.round_record import CentralCounts, SiloRoundStats


@dataclass(slots=True)
class RoundEvents:
    """What a strategy saw in one round, beyond the aggregate: handed to the recorder."""

    rejected: list[tuple[int, str]] = field(default_factory=list)  # (node id, reason)
    privacy: list[PrivacyRelease] = field(default_factory=list)  # silos' local-DP releases
    central: PrivacyRelease | None = None  # the server's central-DP release
    central_in_ledger: bool = False  # the strategy wrote ``central`` to the server ledger itself (write-ahead)
    central_counts: CentralCounts | None = None
    silos: list[SiloRoundStats] = field(default_factory=list)  # per training reply: the anomaly report


class FedrecStrategy(Protocol):
    """What the round loop needs of a strategy: Flower's four methods, a stop, the events."""

    @property
    def stop_reason(self) -> str | None:
        """Why the run must stop (e.g. every silo is out of budget), or None."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]: ...

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]: ...

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]: ...

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None: ...

    def take_events(self) -> RoundEvents:
        """This round's events (the strategy starts collecting the next round's)."""


class UpdateAggregator(FedrecStrategy, Protocol):
    """A strategy split at the seams a wrapper (central DP) needs.

    ``aggregate_train`` of an implementation is ``aggregate_updates`` of the
    contents of ``accept(...)`` plus ``aggregate_train_metrics``; a wrapper may
    transform the accepted updates in between.
    """

    def accept(self, server_round: int, replies: Iterable[Message]) -> list[RecordDict]:
        """The contents of the valid updates among ``replies``; rejections and releases become events."""

    def aggregate_updates(self, contents: list[RecordDict]) -> ArrayRecord | None:
        """The new shared arrays from accepted replies' contents (None when there are none)."""

    def aggregate_train_metrics(self, accepted: list[RecordDict]) -> MetricRecord | None:
        """Training metrics of the accepted updates."""

