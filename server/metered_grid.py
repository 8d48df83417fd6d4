"""A Grid wrapper that counts the payload bytes of every message each round."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

_SCALAR_BYTES = 8  # a metric/config number travels as a 64-bit value


def payload_bytes(content: RecordDict) -> int:
    """Bytes of arrays plus 8 bytes per metric/config value (framing excluded)."""
    total = sum(len(arr.data) for rec in content.array_records.values() for arr in rec.values())
    for rec in [*content.metric_records.values(), *content.config_records.values()]:
        for value in rec.values():  # type: ignore[attr-defined]
            total += _SCALAR_BYTES * (len(value) if isinstance(value, (list, bytes, str)) else 1)
    return total


@dataclass
class Traffic:
    """Bytes sent to and received from silos, and messages that got no reply."""

    sent: int = 0
    received: int = 0
    messages: int = 0
    replies: int = 0
    missing_nodes: tuple[int, ...] = ()


class MeteredGrid:
    """Delegates to a Flower Grid and counts traffic in :attr:`traffic`.

    Strategies only call ``get_node_ids`` and ``send_and_receive``; everything else is
    forwarded unchanged.
    """

    def __init__(self, grid: Grid, poll_interval: float = 0.1) -> None:
        self._grid = grid
        self.traffic = Traffic()
        self.poll_interval = poll_interval

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._grid, name)

    def reset(self) -> Traffic:
        """Return the traffic so far and start counting from zero."""
        traffic, self.traffic = self.traffic, Traffic()
        return traffic

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send, wait for replies, and count both directions."""
        messages = list(messages)
        replies, sent_to = self._push_and_pull(messages, timeout)
        t = self.traffic
        t.sent += sum(payload_bytes(m.content) for m in messages)
        t.received += sum(payload_bytes(r.content) for r in replies if not r.has_error())
        t.messages += len(messages)
        t.replies += len(replies)
        answered = {r.metadata.src_node_id for r in replies if not unanswered(r, sent_to)}
        missing = {m.metadata.dst_node_id for m in messages} - answered
        t.missing_nodes = tuple(sorted({*t.missing_nodes, *missing}))
        for reply in replies:
            attribute_to_recipient(reply, sent_to)
        return replies

    def _push_and_pull(self, messages: list[Message], timeout: float | None) -> tuple[list[Message], dict[str, int]]:
        """Flower's send-and-receive loop with a short poll interval; the replies and message id → node.

        Flower 1.41's ``Grid.send_and_receive`` sleeps 3 s between pulls (hard-coded),
        which adds up to 3 s to every exchange on a fast network; this loop uses the
        Grid's public ``push_messages``/``pull_messages`` and polls every
        :attr:`poll_interval` seconds (one small local request to the SuperLink).
        """
        pending = set(self._grid.push_messages(messages))
        # a pushed message carries the id the Grid gave it (Flower's grids and fedrec's set it)
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll_interval)
        return replies, sent_to


#: Error codes of the replies the SuperLink itself makes when a node does not answer (expired
#: message, lost reply, lapsed heartbeat).
UNANSWERED_CODES = frozenset({ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                              ErrorCode.NODE_UNAVAILABLE})  # fmt: skip


def unanswered(reply: Message, sent_to: dict[str, int]) -> bool:
    """Whether ``reply`` stands for no answer: the SuperLink's, not the node's own.

    Sent from another node than the instruction's recipient, or carrying one of the
    SuperLink's :data:`UNANSWERED_CODES` (in-process grids number nodes from 1, the
    SuperLink's own id, so the sender alone cannot tell).
    """
    recipient = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
    return reply.metadata.src_node_id != recipient or (reply.has_error() and reply.error.code in UNANSWERED_CODES)


def attribute_to_recipient(reply: Message, sent_to: dict[str, int]) -> None:
    """Name the silo an error reply is about: the node its instruction went to.

    The SuperLink answers for a node it cannot reach (e.g. "Node Unavailable" once the
    node's heartbeat lapsed) with an error reply from itself, node 1
    (``SUPERLINK_NODE_ID``); every rejection and log line would then blame node 1, which
    may be an honest silo's id. Such a reply's sender becomes the instruction's
    recipient. A node's own replies (ids that match) are left as they are; an unreachable
    node still counts as missing (:meth:`MeteredGrid.send_and_receive`).
    """
    node = sent_to.get(reply.metadata.reply_to_message_id)
    if node is not None and reply.has_error() and reply.metadata.src_node_id != node:
        reply.metadata.__dict__["_src_node_id"] = node  # Metadata has no public setter for it
