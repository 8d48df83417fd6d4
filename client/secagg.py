"""A silo's side of secure aggregation: the ``query.secagg`` handler.

Each stage message advances the silo's :class:`~common.secagg.protocol.ClientProtocol`,
kept between messages in ``context.state`` (ConfigRecord :data:`STATE_PROTOCOL`; in a
deployment the SuperNode keeps a node's Context for the whole run). The vector the
silo contributes is staged beforehand with :func:`stage_input` (by whatever computed
it: the round's training handler, in distributed DP its clipped, noised sum of user
deltas) into ``context.state`` (ArrayRecord :data:`STATE_INPUT`), tagged with its
round; the ``collect`` stage reads it, masks it and deletes it, so a vector is never
sent twice and never outside the round it was made for.

Stochastic rounding draws from the OS's entropy unless a generator is passed (tests).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from common.secagg import wire
from common.secagg.protocol import COLLECT, SETUP, SHARE_KEYS, UNMASK, ClientProtocol, SecAggError

ACTION = wire.ACTION  # the ClientApp registers handle() as @app.query(ACTION): "query.secagg"
STATE_PROTOCOL = "fedrec.secagg"  # ConfigRecord: the protocol state of the current secure sum
STATE_INPUT = "fedrec.secagg-input"  # ArrayRecord: "round" (one int) and "vector" (float64)

VectorSource = Callable[[Context, int], np.ndarray]


def stage_input(context: Context, server_round: int, vector: np.ndarray) -> None:
    """Keep ``vector`` as this silo's contribution to round ``server_round``'s secure sum."""
    flat = np.asarray(vector, dtype=np.float64)
    if flat.ndim != 1:
        raise SecAggError(f"stage_input: the vector must be 1-D, got shape {flat.shape}")
    context.state[STATE_INPUT] = ArrayRecord(
        {"round": Array(np.array([server_round], dtype=np.int64)), "vector": Array(flat)}
    )


def staged_input(context: Context, server_round: int) -> np.ndarray:
    """The vector staged for ``server_round`` (removed from the state)."""
    if STATE_INPUT not in context.state.array_records:
        raise SecAggError(f"collect: no vector staged for round {server_round} in this silo")
    record = context.state.array_records[STATE_INPUT]
    staged_round = int(record["round"].numpy()[0])
    if staged_round != server_round:
        raise SecAggError(
            f"collect: the staged vector is for round {staged_round}, the secure sum is round {server_round}"
        )
    vector = record["vector"].numpy()
    del context.state[STATE_INPUT]
    return vector


def handle(
    msg: Message,
    context: Context,
    *,
    vector_source: VectorSource = staged_input,
    rng: np.random.Generator | None = None,
) -> Message:
    """Run one stage of the secure sum for this node; reply with the stage's payload."""
    stage, payload = wire.decode(msg.content, f"secagg message to node {context.node_id}")
    if stage == SETUP:
        protocol = ClientProtocol(context.node_id)
    elif STATE_PROTOCOL in context.state.config_records:
        protocol = ClientProtocol.from_state(context.state.config_records[STATE_PROTOCOL])
    else:
        raise SecAggError(f"{stage}: node {context.node_id} has no secure sum in progress (no setup seen)")
    if stage == SETUP:
        reply = protocol.setup(payload)
    elif stage == SHARE_KEYS:
        reply = protocol.share_keys(payload)
    elif stage == COLLECT:
        vector = vector_source(context, int(payload["round"]))
        reply = protocol.collect(payload, vector, rng if rng is not None else np.random.default_rng())
    else:
        reply = protocol.unmask(payload)
    if stage == UNMASK:  # the sum is done: drop the keys and shares
        del context.state[STATE_PROTOCOL]
    else:
        context.state[STATE_PROTOCOL] = ConfigRecord(protocol.to_state())  # type: ignore[arg-type]
    return Message(wire.encode(stage, reply), reply_to=msg)
