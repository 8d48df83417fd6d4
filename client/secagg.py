"""A silo's side of secure aggregation: the ``query.secagg`` handler.

Each stage message advances the silo's :class:`~common.secagg.protocol.ClientProtocol`,
kept between messages in ``context.state`` (ConfigRecord :data:`STATE_PROTOCOL`; in a
deployment the SuperNode keeps a node's Context for the whole run). The vector the
silo contributes is staged beforehand with :func:`stage_input` (by whatever computed
it: the round's training handler, in distributed DP its clipped, noised sum of user
deltas) into ``context.state`` (ArrayRecord :data:`STATE_INPUT`), tagged with its
round; the ``collect`` stage reads it, masks it and deletes it, so a vector is never
sent twice and never outside the round it was made for.

The rounding onto the grid needs no randomness of the silo's: the zero-sum dither comes
from the pairs' ECDH secrets (:func:`common.secagg.protocol.pairwise_streams`).

For tests of real deployments only, :data:`TEST_HOOK_ENV` (unset: off) names a directory:
the silo writes there a copy of every vector it stages and can be made to hang at a given
stage, so a test can kill its process at a known point of the protocol.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.common.logger import log

from common.secagg import wire
from common.secagg.protocol import COLLECT, SETUP, SHARE_KEYS, UNMASK, ClientProtocol, SecAggError

ACTION = wire.ACTION  # the ClientApp registers handle() as @app.query(ACTION): "query.secagg"
STATE_PROTOCOL = "fedrec.secagg"  # ConfigRecord: the protocol state of the current secure sum
STATE_INPUT = "fedrec.secagg-input"  # ArrayRecord: "round" (one int) and "vector" (float64)

VectorSource = Callable[[Context, int], np.ndarray]

TEST_HOOK_ENV = "FEDREC_TEST_SECAGG_DIR"
"""Test-only fault injection, off unless this environment variable names a directory D.

Silo k (partition id) then saves each vector it stages for round r as ``D/staged-p<k>-r<r>.npy``
(the last one of the round), and on receiving stage X of round r, if ``D/hang-p<k>-r<r>-<X>``
exists, writes its node ID to ``D/hung-p<k>-r<r>-<X>`` and stops answering (it sleeps, for at most
:data:`TEST_HANG_SECONDS`) until the test kills it (tests/integration/test_distributed_deploy.py)."""
TEST_HANG_SECONDS = 600.0


def stage_input(context: Context, server_round: int, vector: np.ndarray) -> None:
    """Keep ``vector`` as this silo's contribution to round ``server_round``'s secure sum."""
    flat = np.asarray(vector, dtype=np.float64)
    if flat.ndim != 1:
        raise SecAggError(f"stage_input: the vector must be 1-D, got shape {flat.shape}")
    context.state[STATE_INPUT] = ArrayRecord(
        {"round": Array(np.array([server_round], dtype=np.int64)), "vector": Array(flat)}
    )
    hook = os.environ.get(TEST_HOOK_ENV)
    if hook:
        np.save(Path(hook) / f"staged-p{context.node_config.get('partition-id')}-r{server_round}.npy", flat)


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
) -> Message:
    """Run one stage of the secure sum for this node; reply with the stage's payload."""
    stage, payload = wire.decode(msg.content, f"secagg message to node {context.node_id}")
    hook = os.environ.get(TEST_HOOK_ENV)
    if hook:
        _test_hang(Path(hook), context, stage, payload.get("round"))
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
        reply = protocol.collect(payload, vector)
        if protocol.beyond:
            assert protocol.params is not None
            log(WARNING, "secure sum of round %s: %d of this silo's %d coordinates lie beyond the range r = %.4g; "
                "the sum is refused if the silos' total leaves ±S·r", payload.get("round"), protocol.beyond,
                vector.size, protocol.params.quant.clip_range)  # fmt: skip
    else:
        reply = protocol.unmask(payload)
    if stage == UNMASK:  # the sum is done: drop the keys and shares
        del context.state[STATE_PROTOCOL]
    else:
        context.state[STATE_PROTOCOL] = ConfigRecord(protocol.to_state())  # type: ignore[arg-type]
    return Message(wire.encode(stage, reply), reply_to=msg)


def _test_hang(hook: Path, context: Context, stage: str, server_round: object) -> None:
    """:data:`TEST_HOOK_ENV`'s hang: if the test asked for it, say so and stop answering."""
    name = f"p{context.node_config.get('partition-id')}-r{server_round}-{stage}"
    if not (hook / f"hang-{name}").exists():
        return
    partial = hook / f".hung-{name}"
    partial.write_text(str(context.node_id))
    partial.replace(hook / f"hung-{name}")
    deadline = time.monotonic() + TEST_HANG_SECONDS
    while time.monotonic() < deadline:  # until the test kills this process
        time.sleep(0.5)
    raise SecAggError(f"{stage}: test hook {TEST_HOOK_ENV}: hung for {TEST_HANG_SECONDS:.0f} s and was not killed")
