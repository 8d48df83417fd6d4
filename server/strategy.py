"""FedAvg over the shared parameters, with reply validation and sum-based evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from common import records
from common.config import StrategySettings
from common.evaluation import EvalProtocol, add_sums, summarize, sums_problem
from common.models import ITEM_TABLES
from common.privacy import release
from common.privacy.clipping import l2_norm
from server import defences, validation
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

    def __init__(
        self,
        settings: StrategySettings,
        k: int,
        ledgers: RunLedgers | None = None,
        registry: Callable[[int], Mapping[int, int]] | None = None,
        protocol: EvalProtocol | None = None,
    ) -> None:
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
        self.settings = settings
        self.k = k
        self.protocol = protocol  # when given, every evaluation reply is checked against it
        self.ledgers = ledgers
        self.registered: dict[int, int] = {}
        self._registry = registry  # called once, with the number of nodes, at the first round
        self._candidates: list[defences.Candidate] = []
        self._bound: float | None = None
        self._stop_reason: str | None = None
        self._events = RoundEvents()

    @property
    def stop_reason(self) -> str | None:
        """Set when every silo of a round declined (privacy budgets spent)."""
        return self._stop_reason

    def take_events(self) -> RoundEvents:
        """This round's rejections, privacy releases and anomaly report."""
        events, self._events = self._events, RoundEvents()
        events.silos = [c.stats(self._bound) for c in self._candidates]
        self._candidates, self._bound = [], None
        return events

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the arrays sent (to validate replies); tell silos what ledger lines we hold."""
        self.current = arrays
        if self._registry is not None:
            self.registered = dict(self._registry(len(list(grid.get_node_ids()))))
            self._registry = None
            log(INFO, "registered FedAvg weights (the cap of each silo's claim): %s", self.registered or "none known")
        if self.ledgers is not None:
            config = ConfigRecord({**config, records.LEDGER_COUNTS: self.ledgers.counts()})
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Tell silos what ledger lines we hold (a noisy evaluation sends only new ones)."""
        if self.ledgers is not None:
            config = ConfigRecord({**config, records.LEDGER_COUNTS: self.ledgers.counts()})
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Add up the valid silos' evaluation sums; an unusable reply is rejected and recorded.

        Under the release policy (:mod:`common.privacy.release`) a silo may withhold
        its sums (counted) or send noisy ones with their privacy release and ledger
        lines (verified like a training reply's, the release kept in the round's
        events); noisy and exact sums are never pooled together.
        """
        valid, noisy, withheld = [], [], 0
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self._reject(server_round, node, f"evaluation: silo failed: {msg.error.reason}")
                continue
            metrics = msg.content.metric_records.get(records.METRICS)
            if metrics is not None and metrics.get(records.EVAL_WITHHELD) == 1:
                withheld += 1
                continue
            if metrics is not None and metrics.get(records.EVAL_NOISY) == 1:
                problem = self._receive_ledger(msg.content) or release.noisy_problem(metrics, self.k)
                rel, release_problem = validation.privacy_release(msg.content)
                if problem is None and release_problem is None and rel is not None:
                    self._events.privacy.append(rel)
                    noisy.append(dict(metrics))
                else:
                    self._reject(server_round, node, f"evaluation: {problem or release_problem or 'no privacy record'}")
                continue
            problem = "reply has no metrics" if metrics is None else self._sums_problem(metrics)
            if problem is not None:
                self._reject(server_round, node, f"evaluation: {problem}")
                continue
            valid.append(msg.content)
        if valid and noisy:
            self._reject(server_round, 0, "evaluation: exact and noisy sums in one round; only the noisy ones are used")
            valid = []
        out: dict[str, int | float | list[int] | list[float]] = {}
        if valid:
            out.update(_aggregate_eval_sums(valid, self.k))
        elif noisy:
            out.update(release.noisy_summary(noisy, self.k))
            out[records.TRAIN_SILOS] = len(noisy)
        if withheld:
            out[records.EVAL_WITHHELD_SILOS] = withheld
        return MetricRecord(out) if out else None

    def _sums_problem(self, metrics: MetricRecord) -> str | None:
        sums = {k: v for k, v in metrics.items() if k != records.NUM_EXAMPLES}
        if self.protocol is None or self.current is None:
            return None
        num_items = next((a.shape[0] for name, a in self.current.items() if name.split(".")[0] in ITEM_TABLES), 0)
        return sums_problem(sums, self.protocol, num_items)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop invalid updates (recorded as rejected), then FedAvg."""
        accepted = self.accept(server_round, replies)
        return self.aggregate_updates(accepted), self.aggregate_train_metrics(accepted)

    def aggregate_updates(self, contents: list[RecordDict]) -> ArrayRecord | None:
        """The configured aggregate (``strategy.aggregator``) of the accepted shared arrays.

        The aggregate is checked before it may replace the model
        (:func:`server.defences.aggregate_problem`); a failing one is recorded as
        rejected by the server (node 0) and the round keeps the current model.
        """
        if not contents or self.current is None:
            return None
        base = {k: v.numpy().astype(np.float64) for k, v in self.current.items()}
        updates = [
            {k: c.array_records[records.ARRAYS][k].numpy().astype(np.float64) - base[k] for k in base} for c in contents
        ]
        weights = [float(c.metric_records[records.METRICS][records.NUM_EXAMPLES]) for c in contents]  # type: ignore[arg-type]
        total = defences.aggregate(updates, weights, self.settings)
        if total is None:
            return None
        problem = defences.aggregate_problem(total, updates)
        if problem is not None:
            self._reject(0, 0, f"aggregate rejected, the model is kept: {problem}")
            return None
        defences.set_cosines(self._candidates, total)
        return defences.new_arrays(self.current, total)

    def aggregate_train_metrics(self, accepted: list[RecordDict]) -> MetricRecord | None:
        """Example-weighted loss, slowest silo's time, number of silos."""
        if not accepted:
            return None
        return _aggregate_train_metrics(accepted, records.NUM_EXAMPLES)

    def accept(self, server_round: int, replies: Iterable[Message]) -> list[RecordDict]:
        """The valid updates of a round after the defences; records rejections, releases, declines.

        A reply is rejected (and recorded with its reason, never raised) when it is an
        error, its ledger lines do not continue the silo's chain, its privacy record
        or metrics do not parse, its arrays do not match the model sent, or it claims
        a partition another reply of the round already claimed. Accepted updates get
        their weight capped at the silo's registered weight and their norm bounded
        (:mod:`server.defences`); the returned contents carry the bounded update and
        capped weight.
        """
        candidates = self._screen(server_round, replies)
        self._candidates = candidates
        self._bound = defences.norm_bound([c.norm for c in candidates], self.settings)
        defences.bound_norms(candidates, self._bound, self.settings.norm_action)
        if self.settings.reject_opposed:
            defences.reject_opposed(candidates, self.settings.min_cosine)
        accepted = []
        for c in candidates:
            if c.rejected is not None:
                self._reject(server_round, c.node, c.rejected)
            elif self.current is not None:
                accepted.append(defences.weighted_content(self.current, c))
        return accepted

    def _screen(self, server_round: int, replies: Iterable[Message]) -> list[defences.Candidate]:
        candidates: list[defences.Candidate] = []
        claimed: set[int] = set()
        seen, declined = 0, 0
        for msg in replies:
            seen += 1
            node = msg.metadata.src_node_id
            if msg.has_error():
                # A silo that failed (bad data path, unreadable files, crash) says why.
                self._reject(server_round, node, f"silo failed: {msg.error.reason}")
                continue
            ledger_problem = self._receive_ledger(msg.content)
            if ledger_problem is not None:
                self._reject(server_round, node, ledger_problem)
                continue
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
                        server_round,
                        release.partition_id,
                        release.epsilon,
                        release.epsilon_if_trained,
                    )
                    continue
            metrics = msg.content.metric_records.get(records.METRICS)
            problem = validation.update_problem(msg.content, self.current) or defences.metrics_problem(metrics)
            pid = None if metrics is None else metrics.get(records.PARTITION_ID)
            if problem is None and isinstance(pid, int) and pid in claimed:
                problem = f"claims partition {pid}, which another reply of this round already claimed"
            if problem is not None or metrics is None or self.current is None:
                self._reject(server_round, node, problem or "reply has no metrics")
                continue
            if isinstance(pid, int):
                claimed.add(pid)
            got = msg.content.array_records[records.ARRAYS]
            update = {
                k: got[k].numpy().astype(np.float64) - v.numpy().astype(np.float64) for k, v in self.current.items()
            }
            claimed_weight = float(metrics[records.NUM_EXAMPLES])  # type: ignore[arg-type]
            candidates.append(
                defences.Candidate(
                    msg=msg,
                    node=node,
                    partition_id=pid if isinstance(pid, int) else None,
                    weight_claimed=claimed_weight,
                    weight_used=defences.capped_weight(
                        claimed_weight, pid if isinstance(pid, int) else None, self.registered, self.settings
                    ),
                    update=update,
                    norm=l2_norm(update),
                )
            )
        if seen and declined == seen:
            self._stop_reason = f"every silo reached its privacy budget (round {server_round})"
        return candidates

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        self._events.rejected.append((node, reason))
        log(WARNING, "round %d: rejected the reply of node %d: %s", server_round, node, reason)

    def _receive_ledger(self, content: RecordDict) -> str | None:
        """Verify and write a reply's new ledger lines; the reason when they are unusable."""
        if self.ledgers is None or records.LEDGER not in content.config_records:
            return None
        rec = content.config_records[records.LEDGER]
        try:
            pid = int(rec[records.LEDGER_PARTITION])  # type: ignore[arg-type]
            first = int(rec[records.LEDGER_FIRST_SEQ])  # type: ignore[arg-type]
            lines = [str(x) for x in rec[records.LEDGER_LINES]]  # type: ignore[union-attr]
        except (KeyError, TypeError, ValueError) as exc:
            self.ledgers.problems.append(f"malformed ledger record in a reply: {exc!r}")
            return f"ledger record malformed ({exc!r})"
        if not self.ledgers.receive(pid, first, lines):
            return f"ledger lines of silo {pid} do not continue its chain: {self.ledgers.problems[-1]}"
        return None


def _aggregate_train_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weight sum and silo count; loss and seconds only when every silo sent them.

    Under DP (:mod:`common.privacy.release`) silos keep their loss and seconds.
    """
    metrics = [c.metric_records[records.METRICS] for c in contents]
    weights = np.array([float(m[weight_key]) for m in metrics])  # type: ignore[arg-type]
    out: dict[str, int | float | list[int] | list[float]] = {
        records.NUM_EXAMPLES: int(weights.sum()),
        records.TRAIN_SILOS: len(metrics),
    }
    if all(records.TRAIN_LOSS in m for m in metrics):
        losses = np.array([float(m[records.TRAIN_LOSS]) for m in metrics])  # type: ignore[arg-type]
        out[records.TRAIN_LOSS] = float(weights @ losses / weights.sum())
    for key in (records.TRAIN_SECONDS, records.TRAIN_CPU_SECONDS):  # the slowest silo
        if all(key in m for m in metrics):
            out[key] = max(float(m[key]) for m in metrics)  # type: ignore[arg-type]
    return MetricRecord(out)


def _aggregate_eval_sums(contents: list[RecordDict], k: int) -> MetricRecord:
    parts = []
    for c in contents:
        m = dict(c.metric_records[records.METRICS])
        m.pop(records.NUM_EXAMPLES)
        parts.append(m)
    summary = summarize(add_sums(parts), k)  # type: ignore[arg-type]
    return MetricRecord({**summary, records.TRAIN_SILOS: len(contents)})
