"""The round loop: drive a Flower strategy round by round, recording each round.

Flower's ``Strategy.start`` runs all rounds in one call and returns at the end; fedrec
needs to checkpoint after every round, count traffic, evaluate every N rounds and
(for resuming) start at a later round, so it drives the strategy's own
``configure_*``/``aggregate_*`` methods instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.supercore import log

from common import records
from common.privacy import release
from common.privacy.events import PrivacyRelease
from common.round_record import RoundRecord
from server.metered_grid import MeteredGrid
from server.protocol import FedrecStrategy


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
) -> ArrayRecord:
    """Run rounds ``first_round..last_round``; return the final shared arrays.

    ``on_round_end`` receives each round's record (with the strategy's events of
    that round) and the aggregated arrays (checkpointing happens there, before the
    next round starts), redacted by the release policy of ``privacy_mode``
    (:func:`common.privacy.release.redact_round`). ``on_release`` receives the server's own privacy release
    (central DP) as soon as it is made, before the new model is sent anywhere.
    """
    base = config or ConfigRecord()
    for server_round in range(first_round, last_round + 1):
        start = time.perf_counter()
        instructions = list(strategy.configure_train(server_round, arrays, ConfigRecord(dict(base)), grid))  # type: ignore[arg-type]
        if strategy.stop_reason:
            log(INFO, "fedrec stops before round %d: %s", server_round, strategy.stop_reason)
            break
        replies = grid.send_and_receive(instructions, timeout=timeout)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        events = strategy.take_events()
        if events.central is not None:
            on_release(events.central)
        eval_metrics: MetricRecord | None = None
        if server_round % evaluate_every == 0 or server_round == last_round:
            eval_replies = grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(base)), grid),  # type: ignore[arg-type]
                timeout=timeout,
            )
            eval_metrics = strategy.aggregate_evaluate(server_round, eval_replies)
            evaluated = strategy.take_events()
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
        on_round_end(record, arrays)
        log(INFO, "fedrec %s", progress_line(record, last_round))
        for line in privacy_lines(record):
            log(INFO, "fedrec   %s", line)
        if strategy.stop_reason:
            log(INFO, "fedrec stops after round %d: %s", server_round, strategy.stop_reason)
            break
    return arrays


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
