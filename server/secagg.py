"""The server's side of secure aggregation over a Flower Grid.

:func:`secure_sum` runs the four SecAgg+ stages of
:class:`~common.secagg.protocol.ServerProtocol` with the sampled nodes, one
``send_and_receive`` per stage (the way :mod:`server.loop` talks to nodes, so a
:class:`~server.metered_grid.MeteredGrid` counts its traffic), and returns the
decoded sum of the surviving silos' vectors with who dropped at which stage. A node
that does not answer within ``timeout``, or answers with an error, is dropped from
that stage on; fewer than the threshold at any stage raises
:class:`~common.secagg.protocol.SecAggError` and no sum is released.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, Protocol

from flwr.app import Message
from flwr.supercore import log

from common.secagg import wire
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
) -> SecAggOutcome:
    """The sum of the vectors the nodes ``node_ids`` staged for ``server_round``.

    ``threshold`` defaults to :func:`~common.secagg.protocol.default_threshold`.
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
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
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
