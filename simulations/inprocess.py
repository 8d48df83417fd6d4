"""In-process federation: a Grid that runs the real ClientApp for each message, no Ray.

It serialises every message and reply through Flower's protobuf serde, so what
crosses it is exactly what would cross the network. The scale and privacy-utility
benchmarks use it to measure fedrec's own per-client cost without Ray's.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Scalar = bool | int | float | str


class InProcessGrid(Grid):
    """A Grid whose nodes are in-process ClientApp instances with persistent state.

    ``push_messages`` runs the destination node's ClientApp on each message at once
    and keeps the reply; ``pull_messages`` hands those replies out (each once). A
    reply is therefore ready as soon as its message is pushed, and a caller's
    push-then-poll loop finishes on its first pull.

    Parameters
    ----------
    app : ClientApp
        The ClientApp each node runs.
    run_config : mapping
        The run config every node's Context gets.
    num_nodes : int
        Nodes are numbered 1..num_nodes and get ``partition-id = node - 1``.
    """

    def __init__(self, app: ClientApp, run_config: Mapping[str, Scalar], num_nodes: int) -> None:
        # Flower's runtime sets the identity of the running task; messages need it.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.app = app
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node in range(1, num_nodes + 1)
        }
        self._replies: dict[str, Message] = {}  # message id -> reply, in push order

    def set_run(self, run):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Give each message an ID, run its node's ClientApp on it and keep the reply."""
        message_ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            wire = message_from_proto(message_to_proto(msg))
            self._replies[wire.metadata.message_id] = self._run_node(wire)
            message_ids.append(wire.metadata.message_id)
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The kept replies to ``message_ids``, in push order; each is handed out once."""
        wanted = set(message_ids)
        ready = [message_id for message_id in self._replies if message_id in wanted]
        return [self._replies.pop(message_id) for message_id in ready]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull; ``timeout`` is unused because every reply is ready after the push."""
        return self.pull_messages(self.push_messages(messages))

    def _run_node(self, wire: Message) -> Message:
        """Run the ClientApp of ``wire``'s destination node; return the serialised reply."""
        try:
            reply = self.app(wire, self.contexts[wire.metadata.dst_node_id])
        except Exception as exc:  # noqa: BLE001 - what Flower's runtime does: an error reply
            reply = Message(
                error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}:<'{exc}'>"),
                reply_to=wire,
            )
        return message_from_proto(message_to_proto(reply))


def run_inprocess(run_config: Mapping[str, Scalar], num_nodes: int) -> InProcessGrid:
    """Run the fedrec server side over an :class:`InProcessGrid`; return the grid."""
    from client.app import app as client_app
    from server.federation import run_federation

    grid = InProcessGrid(client_app, run_config, num_nodes)
    run_federation(grid, run_config)
    return grid
