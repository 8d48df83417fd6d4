"""In-process federation: a Grid that runs the real ClientApp for each message, no Ray.

It serialises every message and reply through Flower's protobuf serde, so what a
test inspects is exactly what would cross the network. Used by the tests and by
the scale benchmark to separate fedrec's own per-client cost from Ray's.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Scalar = bool | int | float | str


class LocalGrid(Grid):
    """A Grid whose nodes are in-process ClientApp instances with persistent state.

    Parameters
    ----------
    app : ClientApp
        The ClientApp each node runs.
    run_config : mapping
        The run config every node's Context gets.
    num_nodes : int
        Nodes are numbered 1..num_nodes and get ``partition-id = node - 1``.
    on_reply : callable, optional
        Called with every reply (after serialisation) — lets tests inspect traffic.
    drop : callable, optional
        ``drop(node_id, message) -> bool``: simulate a node that does not answer.
    """

    in_process = True  # MeteredGrid calls send_and_receive directly (no push/pull)

    def __init__(
        self,
        app: ClientApp,
        run_config: Mapping[str, Scalar],
        num_nodes: int,
        on_reply: Callable[[Message], None] | None = None,
        drop: Callable[[int, Message], bool] | None = None,
    ) -> None:
        # Flower's runtime sets the identity of the running task; messages need it.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.app = app
        self.on_reply = on_reply
        self.drop = drop
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

    def set_run(self, run):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            wire = message_from_proto(message_to_proto(msg))
            if self.drop is not None and self.drop(node, wire):
                continue
            try:
                reply = self.app(wire, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - what Flower's runtime does: an error reply
                reply = Message(
                    error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}:<'{exc}'>"),
                    reply_to=wire,
                )
            reply = message_from_proto(message_to_proto(reply))
            if self.on_reply is not None:
                self.on_reply(reply)
            replies.append(reply)
        return replies


def run_inprocess(
    run_config: Mapping[str, Scalar],
    num_nodes: int,
    on_reply: Callable[[Message], None] | None = None,
) -> LocalGrid:
    """Run the fedrec server side over a :class:`LocalGrid`; return the grid."""
    from client.app import app as client_app
    from server.federation import run_federation

    grid = LocalGrid(client_app, run_config, num_nodes, on_reply=on_reply)
    run_federation(grid, run_config)
    return grid
