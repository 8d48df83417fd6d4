"""FedAvg over the shared parameters, with reply validation and sum-based evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from common import records
from common.config import StrategySettings
from common.evaluation import add_sums, summarize
from server.ledger import RunLedgers


class SharedModelFedAvg(FedAvg):
    """Federated averaging of the shared model, weighted by training positives.

    Differences from Flower's :class:`FedAvg`, all by wrapping its methods:

    * a training reply is used only if its arrays have exactly the keys, shapes and
      dtypes of the current shared model and are finite; anything else (a silo that
      sends user embeddings, a corrupted or hostile update) is rejected and recorded
      in :attr:`rejected`;
    * evaluation replies carry *sums*, which are added up and then turned into
      metrics (:func:`common.evaluation.summarize`) rather than averaged;
    * training metrics: loss is the example-weighted mean, time is the slowest silo;
    * a silo under local DP attaches its privacy summary (ε so far, δ, σ, q, steps);
      the summaries are kept per silo in :attr:`privacy_log` (never averaged), and a
      silo that declined the round because of its budget is recorded in
      :attr:`declined`, not treated as an error. When every reply of a round is a
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
        self.rejected: list[tuple[int, int, str]] = []  # (round, node id, reason)
        self.privacy_log: list[dict[str, Any]] = []  # one entry per silo and round
        self.declined: list[tuple[int, int]] = []  # (round, partition id)
        self.stop_reason: str | None = None
        self.ledgers = ledgers

    def restore(self, rounds: list[dict[str, Any]]) -> None:
        """Rebuild the logs of a resumed run from its ``metrics.jsonl`` rounds."""
        for r in rounds:
            for entry in r.get("privacy", []):
                self.privacy_log.append(dict(entry))
                if not entry.get("trained", True):
                    self.declined.append((int(r["round"]), int(entry["partition-id"])))
            for rej in r.get("rejected", []):
                self.rejected.append((int(r["round"]), int(rej["node"]), str(rej["reason"])))

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
        """Drop malformed updates (recorded in :attr:`rejected`), then FedAvg."""
        return super().aggregate_train(server_round, self.accepted_replies(server_round, replies))

    def accepted_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The valid updates of a round; records rejections, privacy summaries, declines."""
        accepted, seen = [], 0
        for msg in replies:
            seen += 1
            node = msg.metadata.src_node_id
            if not msg.has_error():
                self._receive_ledger(msg.content)
            if not msg.has_error() and records.PRIVACY in msg.content.config_records:
                summary = dict(msg.content.config_records[records.PRIVACY])
                self.privacy_log.append({"round": server_round, "node": node, **summary})
                if not summary.get("trained", True):
                    self.declined.append((server_round, int(summary["partition-id"])))  # type: ignore[arg-type]
                    log(
                        INFO,
                        "round %d: silo %s declined (privacy budget): ε %.3f, next round would be %.3f",
                        server_round, summary["partition-id"], summary["epsilon"],
                        summary["epsilon-if-trained"],
                    )
                    continue
            if msg.has_error():
                # A silo that failed (bad data path, unreadable files, crash) says why.
                reason = f"silo failed: {msg.error.reason}"
                self.rejected.append((server_round, node, reason))
                log(WARNING, "round %d: node %d failed: %s", server_round, node, msg.error.reason)
                continue
            reason = self._invalid_reason(msg.content)
            if reason is None:
                accepted.append(msg)
            else:
                self.rejected.append((server_round, node, reason))
                log(WARNING, "round %d: rejected update of node %d: %s", server_round, node, reason)
        declined = sum(1 for r, _ in self.declined if r == server_round)
        if seen and declined == seen:
            self.stop_reason = f"every silo reached its privacy budget (round {server_round})"
        return accepted

    def _receive_ledger(self, content: RecordDict) -> None:
        if self.ledgers is None or records.LEDGER not in content.config_records:
            return
        rec = content.config_records[records.LEDGER]
        try:
            pid, first = int(rec["partition-id"]), int(rec["first-seq"])  # type: ignore[arg-type]
            lines = [str(x) for x in rec["lines"]]  # type: ignore[union-attr]
        except (KeyError, TypeError, ValueError) as exc:
            self.ledgers.problems.append(f"malformed ledger record in a reply: {exc!r}")
            log(WARNING, "malformed ledger record in a reply: %r", exc)
            return
        self.ledgers.receive(pid, first, lines)

    def _invalid_reason(self, content: RecordDict) -> str | None:
        if self.current is None:
            return "no shared model was sent this round"
        if records.ARRAYS not in content.array_records:
            return "reply has no shared parameters"
        got = content.array_records[records.ARRAYS]
        if set(got) != set(self.current):
            extra = sorted(set(got) - set(self.current))
            missing = sorted(set(self.current) - set(got))
            return f"parameter names differ (unexpected {extra}, missing {missing})"
        for name, ref in self.current.items():
            arr = got[name]
            if tuple(arr.shape) != tuple(ref.shape) or arr.dtype != ref.dtype:
                return f"{name}: shape/dtype {arr.shape}/{arr.dtype}, expected {ref.shape}/{ref.dtype}"
            if not np.isfinite(arr.numpy()).all():
                return f"{name}: contains NaN or infinite values"
        metrics = content.metric_records.get(records.METRICS)
        if metrics is None or records.NUM_EXAMPLES not in metrics:
            return f"reply has no '{records.NUM_EXAMPLES}'"
        weight = metrics[records.NUM_EXAMPLES]
        if not isinstance(weight, (int, float)) or not weight > 0:
            return f"'{records.NUM_EXAMPLES}' must be positive, got {weight!r}"
        return None


def _aggregate_train_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    metrics = [c.metric_records[records.METRICS] for c in contents]
    weights = np.array([float(m[weight_key]) for m in metrics])  # type: ignore[arg-type]
    losses = np.array([float(m[records.TRAIN_LOSS]) for m in metrics])  # type: ignore[arg-type]
    return MetricRecord(
        {
            records.NUM_EXAMPLES: int(weights.sum()),
            records.TRAIN_LOSS: float(weights @ losses / weights.sum()),
            records.TRAIN_SECONDS: max(float(m[records.TRAIN_SECONDS]) for m in metrics),  # type: ignore[arg-type]
            "silos": len(metrics),
        }
    )


def _aggregate_eval_sums(contents: list[RecordDict], k: int) -> MetricRecord:
    parts = []
    for c in contents:
        m = dict(c.metric_records[records.METRICS])
        m.pop(records.NUM_EXAMPLES)
        parts.append(m)
    summary = summarize(add_sums(parts), k)  # type: ignore[arg-type]
    return MetricRecord({**summary, "silos": len(contents)})
