"""FedAvg over the shared parameters, with reply validation and sum-based evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore import log

from common import records
from common.config import StrategySettings
from common.evaluation import add_sums, summarize
from server import validation
from server.ledger import RunLedgers
from server.protocol import RoundEvents


class SharedModelFedAvg(FedAvg):
    """Federated averaging of the shared model, weighted by ``num-examples``.

    Differences from Flower's :class:`FedAvg`:

    * a training reply is used only if its arrays have exactly the keys, shapes and
      dtypes of the current shared model and are finite
      (:func:`server.validation.update_problem`); anything else (a silo that sends
      user embeddings, a corrupted or hostile update, an error reply) is rejected
      and recorded in the round's events;
    * evaluation replies carry *sums*, which are added up and then turned into
      metrics (:func:`common.evaluation.summarize`) rather than averaged;
    * training metrics: loss is the example-weighted mean, time is the slowest silo;
    * a silo under local DP attaches its privacy release and new ledger lines; the
      lines are verified and written to the run's ledgers, the releases kept per
      silo in the round's events (never averaged). A silo that declined the round
      because of its budget is not an error; when every reply of a round is a
      decline, :attr:`stop_reason` says so.
    """

    def __init__(self, settings: StrategySettings, k: int, ledgers: RunLedgers | None = None) -> None:
        super().__init__(
            fraction_train=settings.fraction_train,
            fraction_evaluate=settings.fraction_evaluate,
            min_train_nodes=settings.min_nodes,
            min_evaluate_nodes=settings.min_nodes if settings.fraction_evaluate else 0,
            min_available_nodes=settings.min_nodes,
            weighted_by_key=records.NUM_EXAMPLES,
            arrayrecord_key=records.ARRAYS,
            configrecord_key=records.CONFIG,
            train_metrics_aggr_fn=_aggregate_train_metrics,
            evaluate_metrics_aggr_fn=lambda contents, _: _aggregate_eval_sums(contents, k),
        )
        self.current: ArrayRecord | None = None
        self.ledgers = ledgers
        self._stop_reason: str | None = None
        self._events = RoundEvents()

    @property
    def stop_reason(self) -> str | None:
        """Set when every silo of a round declined (privacy budgets spent)."""
        return self._stop_reason

    def take_events(self) -> RoundEvents:
        """This round's rejections and privacy releases."""
        events, self._events = self._events, RoundEvents()
        return events

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the arrays sent (to validate replies); tell silos what ledger lines we hold."""
        self.current = arrays
        if self.ledgers is not None:
            config = ConfigRecord({**config, records.LEDGER_COUNTS: self.ledgers.counts()})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop invalid updates (recorded as rejected), then FedAvg."""
        accepted = self.accept(server_round, replies)
        return self.aggregate_updates([m.content for m in accepted]), self.aggregate_train_metrics(accepted)

    def aggregate_updates(self, contents: list[RecordDict]) -> ArrayRecord | None:
        """The ``num-examples``-weighted mean of the accepted shared arrays."""
        if not contents:
            return None
        return aggregate_arrayrecords(contents, records.NUM_EXAMPLES)

    def aggregate_train_metrics(self, accepted: list[Message]) -> MetricRecord | None:
        """Example-weighted loss, slowest silo's time, number of silos."""
        if not accepted:
            return None
        return _aggregate_train_metrics([m.content for m in accepted], records.NUM_EXAMPLES)

    def accept(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The valid updates of a round; records rejections, privacy releases, declines."""
        accepted, seen, declined = [], 0, 0
        for msg in replies:
            seen += 1
            node = msg.metadata.src_node_id
            if msg.has_error():
                # A silo that failed (bad data path, unreadable files, crash) says why.
                self._reject(server_round, node, f"silo failed: {msg.error.reason}")
                continue
            self._receive_ledger(msg.content)
            release, problem = validation.privacy_release(msg.content)
            if problem is not None:
                self._reject(server_round, node, problem)
                continue
            if release is not None:
                self._events.privacy.append(release)
                if not release.trained:
                    declined += 1
                    log(
                        INFO,
                        "round %d: silo %s declined (privacy budget): ε %.3f, next round would be %.3f",
                        server_round, release.partition_id, release.epsilon, release.epsilon_if_trained,
                    )
                    continue
            problem = validation.update_problem(msg.content, self.current)
            if problem is None:
                accepted.append(msg)
            else:
                self._reject(server_round, node, problem)
        if seen and declined == seen:
            self._stop_reason = f"every silo reached its privacy budget (round {server_round})"
        return accepted

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        self._events.rejected.append((node, reason))
        log(WARNING, "round %d: rejected the reply of node %d: %s", server_round, node, reason)

    def _receive_ledger(self, content: RecordDict) -> None:
        if self.ledgers is None or records.LEDGER not in content.config_records:
            return
        rec = content.config_records[records.LEDGER]
        try:
            pid = int(rec[records.LEDGER_PARTITION])  # type: ignore[arg-type]
            first = int(rec[records.LEDGER_FIRST_SEQ])  # type: ignore[arg-type]
            lines = [str(x) for x in rec[records.LEDGER_LINES]]  # type: ignore[union-attr]
        except (KeyError, TypeError, ValueError) as exc:
            self.ledgers.problems.append(f"malformed ledger record in a reply: {exc!r}")
            log(WARNING, "malformed ledger record in a reply: %r", exc)
            return
        self.ledgers.receive(pid, first, lines)


def _aggregate_train_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    metrics = [c.metric_records[records.METRICS] for c in contents]
    weights = np.array([float(m[weight_key]) for m in metrics])  # type: ignore[arg-type]
    losses = np.array([float(m[records.TRAIN_LOSS]) for m in metrics])  # type: ignore[arg-type]
    return MetricRecord(
        {
            records.NUM_EXAMPLES: int(weights.sum()),
            records.TRAIN_LOSS: float(weights @ losses / weights.sum()),
            records.TRAIN_SECONDS: max(float(m[records.TRAIN_SECONDS]) for m in metrics),  # type: ignore[arg-type]
            records.TRAIN_SILOS: len(metrics),
        }
    )


def _aggregate_eval_sums(contents: list[RecordDict], k: int) -> MetricRecord:
    parts = []
    for c in contents:
        m = dict(c.metric_records[records.METRICS])
        m.pop(records.NUM_EXAMPLES)
        parts.append(m)
    summary = summarize(add_sums(parts), k)  # type: ignore[arg-type]
    return MetricRecord({**summary, records.TRAIN_SILOS: len(contents)})
