"""The server's side of secure aggregation over a Flower Grid.

:func:`secure_sum` runs the four SecAgg+ stages of
:class:`~common.secagg.protocol.ServerProtocol` with the sampled nodes, one
``send_and_receive`` per stage (the way :mod:`server.loop` talks to nodes, so a
:class:`~server.metered_grid.MeteredGrid` counts its traffic), and returns the
decoded sum of the surviving silos' vectors with who dropped at which stage. Once the
masked vectors are in and before any unmask share is asked for, it calls ``before_unmask``
with the nodes whose vectors will be in the sum: the caller accounts the release there, so
the server's ledger holds it before the server can learn the sum. A node
that does not answer within ``timeout``, or answers with an error, is dropped from
that stage on; fewer than the threshold at any stage raises
:class:`~common.secagg.protocol.SecAggError` and no sum is released.

:func:`dropout_event` describes, for the server's ledger, the silos whose vectors (and so
noise shares) are missing from a released sum, the stage at which each was lost, and what
that means for the noise the sum carries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, Protocol

from flwr.app import Message
from flwr.supercore import log

from common.secagg import DROPOUT_EVENT, wire
from common.secagg.protocol import (
    COLLECT,
    SETUP,
    SHARE_KEYS,
    UNMASK,
    SecAggError,
    SecAggOutcome,
    SecAggParams,
    ServerProtocol,
    default_threshold,
)
from common.secagg.quantize import QuantSpec


class SendsAndReceives(Protocol):
    """What :func:`secure_sum` needs of a Grid."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]: ...


def secure_sum(
    grid: SendsAndReceives,
    node_ids: Sequence[int],
    *,
    quant: QuantSpec,
    vector_length: int,
    server_round: int,
    threshold: int | None = None,
    timeout: float | None = None,
    before_unmask: Callable[[tuple[int, ...], Mapping[str, tuple[int, ...]]], None] | None = None,
) -> SecAggOutcome:
    """The sum of the vectors the nodes ``node_ids`` staged for ``server_round``.

    ``threshold`` defaults to :func:`~common.secagg.protocol.default_threshold`.
    ``before_unmask(survivors, dropped)`` runs after the collect stage, before the unmask
    stage: ``survivors`` are the nodes whose masked vectors are in the sum (a node that
    drops at unmask stays in it), ``dropped`` the nodes lost so far by stage. The server
    cannot remove the masks, so knows nothing of the sum, until the unmask replies arrive.
    """
    nodes = tuple(sorted(node_ids))
    params = SecAggParams(
        server_round=server_round,
        threshold=default_threshold(len(nodes)) if threshold is None else threshold,
        quant=quant,
        vector_length=vector_length,
        nodes=nodes,
    )
    server = ServerProtocol(params)
    setup = server.setup_payload()
    server.receive_keys(_exchange(grid, SETUP, dict.fromkeys(nodes, setup), server_round, timeout))
    server.receive_shares(_exchange(grid, SHARE_KEYS, server.share_keys_payloads(), server_round, timeout))
    server.receive_masked(_exchange(grid, COLLECT, server.collect_payloads(), server_round, timeout))
    if before_unmask is not None:
        before_unmask(tuple(server.active), {k: v for k, v in server.dropped.items() if v})
    outcome = server.receive_unmask(_exchange(grid, UNMASK, server.unmask_payloads(), server_round, timeout))
    log(
        INFO,
        "fedrec secure sum of round %d: %d of %d silos in the sum, dropped %s, error <= %.3g per coordinate",
        server_round, len(outcome.survivors), len(nodes), outcome.dropped or "none", outcome.error_bound,
    )  # fmt: skip
    return outcome


def _exchange(
    grid: SendsAndReceives,
    stage: str,
    payloads: Mapping[int, Mapping[str, Any]],
    server_round: int,
    timeout: float | None,
) -> dict[int, dict[str, Any]]:
    """Send each node its payload of ``stage``; the payloads of the nodes that answered."""
    messages = [
        Message(wire.encode(stage, p), dst_node_id=n, message_type=wire.MESSAGE_TYPE, group_id=str(server_round))
        for n, p in payloads.items()
    ]
    replies: dict[int, dict[str, Any]] = {}
    answers = grid.send_and_receive(messages, timeout=timeout)
    # The SuperLink's own error replies (e.g. "Node Unavailable" once a node's heartbeat lapsed)
    # come from node 1, the SuperLink: name the node the instruction went to.
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    for reply in answers:
        node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            reason = reply.error.reason
            log(WARNING, "fedrec secure sum round %d, %s: node %d failed: %s", server_round, stage, node, reason)
            continue
        reply_stage, payload = wire.decode(reply.content, f"{stage} reply of node {node}")
        if reply_stage != stage or int(payload.get("round", -1)) != server_round:
            raise SecAggError(
                f"{stage}: node {node} answered stage {reply_stage!r} of round {payload.get('round')}, expected round "
                f"{server_round}"
            )
        replies[node] = payload
    return replies


__all__ = ["DROPOUT_EVENT", "NOT_STAGED", "dropout_event", "missing_stages", "named_node", "secure_sum"]

NOT_STAGED = "train"
"""The stage named for a silo that never entered the secure sum (no vector staged: failed or silent)."""


def missing_stages(
    nodes: Sequence[int], staged: Iterable[int], survivors: Iterable[int], dropped: Mapping[str, Iterable[int]]
) -> dict[int, str]:
    """Node → where it was lost, for every node of ``nodes`` whose vector is not in the sum of ``survivors``.

    :data:`NOT_STAGED` for a node that never entered the secure sum, else the protocol stage
    (``setup``, ``share-keys`` or ``collect``) it stopped answering at (``dropped``: stage →
    nodes). A node dropped at ``unmask`` had already sent its masked vector: it is in the
    sum, not missing.
    """
    lost = {n: stage for stage, gone in dropped.items() for n in gone}
    in_sum, entered = set(survivors), set(staged)
    return {n: (lost.get(n, NOT_STAGED) if n in entered else NOT_STAGED) for n in sorted(nodes) if n not in in_sum}


def named_node(node: int, partitions: Mapping[int, int]) -> dict[str, object]:
    """A node of a ledger event: ``{"node": id}``, with ``"silo": "silo-<k>"`` when its replies claimed partition k."""
    entry: dict[str, object] = {"node": node}
    if node in partitions:
        entry["silo"] = f"silo-{partitions[node]}"
    return entry


def dropout_event(
    *,
    release: str,
    silos: int,
    max_dishonest: int,
    noise_multiplier: float,
    accounted_noise_multiplier: float,
    survivors: Sequence[int],
    missing: Mapping[int, str],
    partitions: Mapping[int, int],
) -> dict[str, object]:
    """The fields of a :data:`DROPOUT_EVENT`: who is missing from the sum of ``release``, and the noise left.

    The rule (docs/secure-aggregation.md): each silo adds σ·C/√(S − T), so any S − T shares
    carry the full σ·C. With d = len(missing) ≤ T silos missing, the sum carries the nominal σ
    provided at most T − d of the silos in it have their share known to the server; with
    d > T, σ·√((S − d)/(S − T)) (the σ accounted), and only if none of them is known.
    ``partitions`` maps node IDs to the partition ids their replies claimed (may be partial).
    """
    d = len(missing)
    if d == 0:
        raise ValueError("dropout_event: no silo is missing from the sum")
    if not math.isfinite(accounted_noise_multiplier):
        raise ValueError(f"dropout_event: accounted noise multiplier {accounted_noise_multiplier!r}")
    if d <= max_dishonest:
        meaning = (
            f"{d} of {silos} silos' noise shares missing ≤ T = {max_dishonest}: the sum carries the full σ·C, "
            f"σ = {noise_multiplier:.6g}, if at most {max_dishonest - d} of the {silos - d} silos in it also have "
            f"their noise share known to the server"
        )
    else:
        meaning = (
            f"{d} of {silos} silos' noise shares missing > T = {max_dishonest}: the sum carries only "
            f"σ·√((S − d)/(S − T)) = {accounted_noise_multiplier:.6g} (times C), the σ accounted, and only if "
            f"no silo in it has its noise share known to the server"
        )

    return {
        "release": release,
        "silos": silos,
        "max-dishonest-silos": max_dishonest,
        "in-sum": [named_node(n, partitions) for n in sorted(survivors)],
        "missing": [{**named_node(n, partitions), "stage": stage} for n, stage in sorted(missing.items())],
        "nominal-noise-multiplier": noise_multiplier,
        "accounted-noise-multiplier": accounted_noise_multiplier,
        "noise": meaning,
    }
