"""The round loop: drive a Flower strategy round by round, recording each round.

Flower's ``Strategy.start`` runs all rounds in one call and returns at the end; fedrec
needs to checkpoint after every round, count traffic, evaluate every N rounds and
(for resuming) start at a later round, so it drives the strategy's own
``configure_*``/``aggregate_*`` methods instead.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.supercore import log

from common import records
from common.privacy import release
from common.privacy.events import PrivacyRelease
from common.round_record import RoundRecord
from server.metered_grid import MeteredGrid
from server.protocol import FedrecStrategy, RoundEvents


def run_rounds(
    strategy: FedrecStrategy,
    grid: MeteredGrid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    last_round: int,
    timeout: float,
    evaluate_every: int,
    on_round_end: Callable[[RoundRecord, ArrayRecord], None],
    on_release: Callable[[PrivacyRelease], None],
    config: ConfigRecord | None = None,
    privacy_mode: str = "none",
    fused: bool = False,
    on_trained: Callable[[RoundRecord, ArrayRecord], None] | None = None,
    pending: RoundRecord | None = None,
) -> ArrayRecord:
    """Run rounds ``first_round..last_round``; return the final shared arrays.

    ``on_round_end`` receives each round's record (with the strategy's events of
    that round) and the aggregated arrays (checkpointing happens there, before the
    next round starts), redacted by the release policy of ``privacy_mode``
    (:func:`common.privacy.release.redact_round`). ``on_release`` receives the server's own privacy release
    (central DP) as soon as it is made, before the new model is sent anywhere, unless the
    strategy wrote it to the ledger itself (``RoundEvents.central_in_ledger``: distributed DP
    accounts each secure sum before it can be unmasked).

    ``fused`` (run config ``eval.fused``): one exchange per round. A round whose
    model is to be evaluated (and that is not the last) is not evaluated at once: the
    next round's train message asks each silo to evaluate the arrays it carries (this
    round's model) before training, and the reply carries both. The round's record
    then waits for that evaluation: ``on_trained`` receives it without evaluation
    together with the arrays (checkpoint and pending record, written before the next
    message is sent), ``on_round_end`` the complete record once the evaluation is in,
    before the next round's updates are aggregated. A round's ``seconds`` and bytes are
    those of its own exchange (which also carried the previous round's evaluation);
    nodes that did not answer it count as missing in both rounds. ``pending`` is such a
    round of a resumed run (trained and checkpointed, not yet evaluated): ``arrays``
    are its model and ``first_round`` the round after it. The last round, and a round
    after which the run stops, are evaluated by an evaluate exchange of their own.
    """
    base = config or ConfigRecord()
    for server_round in range(first_round, last_round + 1):
        start = time.perf_counter()
        evaluation = _configure_evaluate(strategy, pending, arrays, base, grid)
        instructions = list(strategy.configure_train(server_round, arrays, ConfigRecord(dict(base)), grid))  # type: ignore[arg-type]
        if strategy.stop_reason:
            log(INFO, "fedrec stops before round %d: %s", server_round, strategy.stop_reason)
            if pending is not None:
                _finish(pending, _evaluate(strategy, grid, pending.server_round, evaluation, timeout),
                        grid.reset().missing_nodes, arrays, last_round, privacy_mode, on_round_end)
            return arrays
        replies = list(grid.send_and_receive(fuse(instructions, evaluation), timeout=timeout))
        if pending is not None:
            train_replies, eval_replies = split(replies, evaluation)
            _finish(pending, _aggregate_evaluate(strategy, pending.server_round, eval_replies),
                    _unanswered(evaluation, replies), arrays, last_round, privacy_mode, on_round_end)
            pending = None
        else:
            train_replies = replies
        new_arrays, train_metrics = strategy.aggregate_train(server_round, train_replies)
        if new_arrays is not None:
            arrays = new_arrays
        else:  # said in the round's record, never a silent "completed" round
            train_metrics = MetricRecord({**(train_metrics or {records.TRAIN_SILOS: 0}), records.MODEL_KEPT: 1})
            log(WARNING, "fedrec round %d: no aggregate replaced the shared model (%s silos accepted); it is unchanged",
                server_round, train_metrics.get(records.TRAIN_SILOS, 0))
        events = strategy.take_events()
        if events.central is not None and not events.central_in_ledger:
            on_release(events.central)
        eval_metrics: MetricRecord | None = None
        due = server_round % evaluate_every == 0 or server_round == last_round
        defer = fused and due and server_round < last_round and not strategy.stop_reason
        if due and not defer:
            instructions = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(base)), grid))  # type: ignore[arg-type]
            eval_metrics, evaluated = _evaluate(strategy, grid, server_round, instructions, timeout)
            events.rejected += evaluated.rejected  # evaluation replies that were rejected
            events.privacy += evaluated.privacy  # noisy evaluations' releases
        traffic = grid.reset()
        record = RoundRecord(
            server_round=server_round,
            seconds=time.perf_counter() - start,
            train=dict(train_metrics or {}),  # type: ignore[arg-type]
            evaluate=dict(eval_metrics or {}),  # type: ignore[arg-type]
            bytes_sent=traffic.sent,
            bytes_received=traffic.received,
            missing_nodes=traffic.missing_nodes,
            rejected=tuple(events.rejected),
            privacy=tuple(events.privacy),
            central=events.central,
            central_counts=events.central_counts,
            silos=tuple(events.silos),
        )
        record = release.redact_round(record, privacy_mode)
        if defer:
            pending = record
            if on_trained is not None:
                on_trained(record, arrays)
            log(INFO, "fedrec round %d/%d trained; its evaluation travels with round %d", server_round,
                last_round, server_round + 1)
            continue
        _log_round(record, last_round)
        on_round_end(record, arrays)
        if strategy.stop_reason:
            log(INFO, "fedrec stops after round %d: %s", server_round, strategy.stop_reason)
            break
    return arrays


def fuse(instructions: list[Message], evaluation: list[Message]) -> list[Message]:
    """One message per node: a train message that also carries its node's evaluate instructions.

    A node's evaluate instructions join its train message (as ``records.EVALUATE_CONFIG``)
    when both carry the same arrays; otherwise, and for a node sampled for only one of
    the two, its message goes as it is.
    """
    if not evaluation:
        return instructions
    by_node = {m.metadata.dst_node_id: m for m in evaluation}
    out = []
    for msg in instructions:
        ev = by_node.get(msg.metadata.dst_node_id)
        if ev is None or not _same_arrays(ev.content, msg.content):
            out.append(msg)
            continue
        del by_node[msg.metadata.dst_node_id]
        content = RecordDict(dict(msg.content))
        content[records.EVALUATE_CONFIG] = ev.content.config_records[records.CONFIG]
        out.append(
            Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type,
                    group_id=msg.metadata.group_id, ttl=msg.metadata.ttl)
        )
    return out + list(by_node.values())


def _same_arrays(a: RecordDict, b: RecordDict) -> bool:
    x, y = a.array_records.get(records.ARRAYS), b.array_records.get(records.ARRAYS)
    if x is None or y is None:
        return False
    return x is y or (
        list(x) == list(y)
        and all((x[k].dtype, x[k].shape, x[k].data) == (y[k].dtype, y[k].shape, y[k].data) for k in x)
    )


def split(replies: list[Message], evaluation: list[Message]) -> tuple[list[Message], list[Message]]:
    """The training replies and the evaluation replies of a fused exchange.

    A train reply of a node that was also asked to evaluate gives up its
    ``records.EVALUATION_PREFIX`` records, which become that node's evaluation reply
    (with no such records: an evaluation reply without metrics, rejected as such); a
    node not asked loses them (a resent saved reply of a round evaluated since); an
    error reply counts as both; an evaluate reply is an evaluation reply. The evaluation
    replies come in the order of the evaluate instructions (as an evaluate exchange's
    replies do in process): the server adds their sums in that order.
    """
    asked = {m.metadata.dst_node_id for m in evaluation}
    train, evaluated = [], []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.metadata.message_type == MessageType.EVALUATE:
            evaluated.append(msg)
            continue
        train.append(msg)
        if msg.has_error():
            if node in asked:
                evaluated.append(msg)
            continue
        keys = [k for k in msg.content if k.startswith(records.EVALUATION_PREFIX)]
        part = RecordDict({k.removeprefix(records.EVALUATION_PREFIX): msg.content[k] for k in keys})
        for k in keys:
            del msg.content[k]
        if node in asked:
            evaluated.append(cast(Message, _EvaluationPart(msg.metadata, part)))
    order = {m.metadata.dst_node_id: i for i, m in enumerate(evaluation)}  # the evaluate instructions' order
    evaluated.sort(key=lambda m: order.get(m.metadata.src_node_id, len(order)))
    return train, evaluated


@dataclass(frozen=True, slots=True)
class _EvaluationPart:
    """The evaluation reply inside a fused train reply, as the strategy reads a reply."""

    metadata: Metadata
    content: RecordDict
    error: Error | None = None

    def has_error(self) -> bool:
        return False


def _configure_evaluate(
    strategy: FedrecStrategy, pending: RoundRecord | None, arrays: ArrayRecord, base: ConfigRecord, grid: MeteredGrid
) -> list[Message]:
    if pending is None:
        return []
    return list(strategy.configure_evaluate(pending.server_round, arrays, ConfigRecord(dict(base)), grid))  # type: ignore[arg-type]


def _evaluate(
    strategy: FedrecStrategy, grid: MeteredGrid, server_round: int, instructions: list[Message], timeout: float
) -> tuple[MetricRecord | None, RoundEvents]:
    """An evaluate exchange of its own; the aggregate and the events it made."""
    replies = grid.send_and_receive(instructions, timeout=timeout)
    return _aggregate_evaluate(strategy, server_round, list(replies))


def _aggregate_evaluate(
    strategy: FedrecStrategy, server_round: int, replies: list[Message]
) -> tuple[MetricRecord | None, RoundEvents]:
    metrics = strategy.aggregate_evaluate(server_round, replies)
    return metrics, strategy.take_events()


def _unanswered(evaluation: list[Message], replies: list[Message]) -> tuple[int, ...]:
    answered = {r.metadata.src_node_id for r in replies}
    return tuple(sorted({m.metadata.dst_node_id for m in evaluation} - answered))


def _finish(
    pending: RoundRecord,
    evaluated: tuple[MetricRecord | None, RoundEvents],
    missing: tuple[int, ...],
    arrays: ArrayRecord,
    last_round: int,
    privacy_mode: str,
    on_round_end: Callable[[RoundRecord, ArrayRecord], None],
) -> None:
    """Complete a round whose evaluation came with the next exchange; record it."""
    metrics, events = evaluated
    record = dataclasses.replace(
        pending,
        evaluate=dict(metrics or {}),  # type: ignore[arg-type]
        missing_nodes=tuple(sorted({*pending.missing_nodes, *missing})),
        rejected=(*pending.rejected, *events.rejected),
        privacy=(*pending.privacy, *events.privacy),
    )
    record = release.redact_round(record, privacy_mode)
    _log_round(record, last_round)
    on_round_end(record, arrays)


def _log_round(record: RoundRecord, last_round: int) -> None:
    log(INFO, "fedrec %s", progress_line(record, last_round))
    for line in privacy_lines(record):
        log(INFO, "fedrec   %s", line)


def progress_line(record: RoundRecord, last_round: int) -> str:
    """One human-readable line per round."""
    parts = [f"round {record.server_round}/{last_round}"]
    loss = record.train.get(records.TRAIN_LOSS)
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    for key, value in record.evaluate.items():
        if key.startswith(("val-hr@", "test-hr@", "test-ndcg@", "test-full-recall@")) and "gap" not in key:
            parts.append(f"{key} {value:.4f}")
    if record.privacy:  # per-silo ε: the round's headline is the max, never a mean
        parts.append(f"ε max over silos {max(e.epsilon for e in record.privacy):.3f}")
    if record.central is not None:
        parts.append(f"central ε {record.central.epsilon:.3f}")
    parts.append(f"{record.seconds:.1f}s")
    parts.append(f"up {record.bytes_received / 1e6:.2f} MB / down {record.bytes_sent / 1e6:.2f} MB")
    if record.missing_nodes:
        parts.append(f"missing nodes {list(record.missing_nodes)}")
    if record.train.get(records.MODEL_KEPT):
        parts.append("model unchanged: no aggregate this round")
    return " | ".join(parts)


def privacy_lines(record: RoundRecord) -> list[str]:
    """ε of every silo (and of the server's central DP) after the round."""
    lines = []
    for e in sorted(record.privacy, key=lambda e: e.partition_id or 0):
        status = "trained" if e.trained else f"DECLINED (next round would be ε={e.epsilon_if_trained:.3f})"
        lines.append(
            f"silo {e.partition_id}: ε={e.epsilon:.3f} (budget {e.target_epsilon:g}) "
            f"δ={e.delta:.2e} unit={e.unit} σ={e.noise_multiplier:.3f} "
            f"q={e.sample_rate:.3f} steps={e.total_steps} {status}"
        )
    c, counts = record.central, record.central_counts
    if c is not None:
        aggregated = "" if counts is None else f" silos aggregated {counts.aggregated}/{c.population}"
        what = "central DP, unit=silo" if c.kind == "dp-fedavg" else f"{c.kind}, unit={c.unit}, N={c.population}"
        lines.append(
            f"server ({what}): ε={c.epsilon:.3f} δ={c.delta:.2e} "
            f"z={c.noise_multiplier:.3f} q={c.sample_rate:.3f} S={c.clip:g}{aggregated}"
        )
    return lines
