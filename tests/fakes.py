"""Test doubles: an in-process Grid with fault hooks, and helpers shared by test modules."""

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from client.app import app as client_app
from common import records
from common.config import AppConfig
from common.privacy.events import PrivacyRelease
from common.run_config import load_default_run_config
from common.secagg import wire as secagg_wire
from server.federation import run_federation
from simulations.inprocess import InProcessGrid, Scalar

# The defaults of pyproject.toml (defences included) but plain FedAvg as the aggregator, so
# strategy tests can check FedAvg arithmetic by hand; one node is enough, the timeout short.
STRATEGY_SETTINGS = dataclasses.replace(
    AppConfig.from_run_config(load_default_run_config()).strategy, aggregator="fedavg", min_nodes=1, timeout=10.0
)


def local_dp_run_config(run_dir: Path, rounds: int, **extra: Scalar) -> dict[str, Scalar]:
    """A small local-DP run (300 synthetic users) whose silos keep durable state under the run."""
    cfg = load_default_run_config()
    cfg.update(
        {
            "num-server-rounds": rounds,
            "run-dir": str(run_dir),
            "state-root": str(run_dir / "silos"),
            "data.synthetic.num-users": 300,
            "data.synthetic.num-items": 300,
            "data.synthetic.mean-interactions": 20,
            "model.dim": 16,
            "eval.full-ranking-k": 20,
            "privacy.mode": "local",
            "privacy.local.noise-multiplier": 1.2,
            "privacy.local.target-epsilon": 0.0,
            "privacy.local.batch-size": 20,
            **extra,
        }
    )
    return cfg


class LocalGrid(InProcessGrid):
    """An :class:`InProcessGrid` whose traffic tests can watch and whose nodes can fall silent.

    Parameters
    ----------
    app, run_config, num_nodes
        As for :class:`InProcessGrid`.
    on_reply : callable, optional
        Called with every reply (after serialisation), as soon as its node answers.
    drop : callable, optional
        ``drop(node_id, message) -> bool``: that node does not answer the message. The
        message is then never delivered, so ``push_messages`` returns no ID for it and
        a caller waiting for replies does not wait for this one.
    """

    def __init__(
        self,
        app: ClientApp,
        run_config: Mapping[str, Scalar],
        num_nodes: int,
        on_reply: Callable[[Message], None] | None = None,
        drop: Callable[[int, Message], bool] | None = None,
    ) -> None:
        super().__init__(app, run_config, num_nodes)
        self.on_reply = on_reply
        self.drop = drop

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        message_ids = []
        for msg in messages:
            if self.drop is not None and self.drop(msg.metadata.dst_node_id, msg):
                continue
            message_ids += super().push_messages([msg])
        return message_ids

    def _run_node(self, wire: Message) -> Message:
        reply = super()._run_node(wire)
        if self.on_reply is not None:
            self.on_reply(reply)
        return reply


def run_local(
    run_config: Mapping[str, Scalar],
    num_nodes: int,
    on_reply: Callable[[Message], None] | None = None,
) -> LocalGrid:
    """Run the fedrec server side over a :class:`LocalGrid`; return the grid."""
    grid = LocalGrid(client_app, run_config, num_nodes, on_reply=on_reply)
    run_federation(grid, run_config)
    return grid


class FourNodeGrid:
    """Just enough of a Grid for a strategy's ``configure_*``: nodes 1 to 4."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3, 4]


def train_reply(instruction: Message, arrays: dict[str, np.ndarray], weight: float) -> Message:
    """A training reply to ``instruction`` carrying ``arrays`` and ``weight`` examples."""
    content = RecordDict(
        {
            records.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            records.METRICS: MetricRecord(
                {records.NUM_EXAMPLES: weight, records.TRAIN_LOSS: 1.0, records.TRAIN_SECONDS: 0.1}
            ),
        }
    )
    instruction.metadata.__dict__["_message_id"] = f"m{instruction.metadata.dst_node_id}"
    return Message(content, reply_to=instruction)


SGD_RELEASED = "shared model parameters after the round (item tables, score function)"


def dp_sgd_release(owner: str, round_: int, epsilon: float, **changes: object) -> PrivacyRelease:
    """A silo's DP-SGD release of ``round_`` (189 users, σ 1.2, q 0.17, 6 steps a round)."""
    values: dict = {
        "owner": owner,
        "server_round": round_,
        "kind": "dp-sgd",
        "unit": "user",
        "accountant": "pld",
        "delta": 1e-5,
        "delta_rule": "min(1e-5, 1/(10N)) for the silo's N users",
        "epsilon": epsilon,
        "target_epsilon": 8.0,
        "noise_multiplier": 1.2,
        "sample_rate": 0.17,
        "clip": 1.0,
        "population": 189,
        "steps": 6,
        "total_steps": 6 * round_,
        "rounds_trained": round_,
        "released": SGD_RELEASED,
        "expected_batch_size": 32,
    }
    values.update(changes)
    return PrivacyRelease(**values)


def bce_l2_loss(model):
    """Per-sample DP-SGD loss: BCE over each sample's reads (read 0 the positive) + L2 on its rows.

    The rows reach the loss both through the score and directly (the L2 term).
    """

    def per_sample(rows):
        logits = model.score_rows(rows)
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return bce.sum(1) + 0.01 * sum(rows[n].pow(2).sum(tuple(range(1, rows[n].dim()))) for n in model.l2_tables)

    return per_sample


class UnreachableNodeGrid(LocalGrid):
    """A :class:`LocalGrid` whose SuperLink answers for the nodes in ``unreachable``.

    As Flower's SuperLink does for a node whose heartbeat lapsed, the reply to such a
    node's message is an error ("Node Unavailable") sent by the SuperLink itself, node 1.
    """

    def __init__(self, app: ClientApp, run_config: Mapping[str, Scalar], num_nodes: int, unreachable: set[int]) -> None:
        super().__init__(app, run_config, num_nodes)
        self.unreachable = unreachable

    def _run_node(self, wire: Message) -> Message:
        if wire.metadata.dst_node_id not in self.unreachable:
            return super()._run_node(wire)
        reply = Message(error=Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), reply_to=wire)
        reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
        return reply


class GarbageSecAggGrid(LocalGrid):
    """A :class:`LocalGrid` whose node ``liar`` answers every secure sum's collect stage with random words.

    A hostile silo: its masked vector is uniform on Z_2^32 instead of its quantised vector
    plus masks, so the unmasked sum is near-uniform too. The rest of its replies are honest.
    """

    def __init__(self, app: ClientApp, run_config: Mapping[str, Scalar], num_nodes: int, liar: int) -> None:
        super().__init__(app, run_config, num_nodes)
        self.liar = liar
        self.rng = np.random.default_rng(0)

    def _run_node(self, wire: Message) -> Message:
        reply = super()._run_node(wire)
        if wire.metadata.dst_node_id != self.liar or wire.metadata.message_type != secagg_wire.MESSAGE_TYPE:
            return reply
        stage, payload = secagg_wire.decode(reply.content, "test")
        if stage != "collect":
            return reply
        masked = np.asarray(payload["masked"])
        payload["masked"] = self.rng.integers(0, 2**32, masked.size, dtype=np.uint64).astype(masked.dtype)
        return Message(secagg_wire.encode(stage, payload), reply_to=wire)


class ServerKilled(Exception):
    """Raised by :func:`kill_server_after` where the server process would have died."""


def kill_server_after(monkeypatch, last_round: int) -> None:  # type: ignore[no-untyped-def]
    """Make the server die right after it recorded round ``last_round`` (metrics line, state written)."""
    from server.recorder import RunRecorder

    original = RunRecorder.record_round

    def record_round(self, record, arrays):  # type: ignore[no-untyped-def]
        original(self, record, arrays)
        if record.server_round == last_round:
            raise ServerKilled

    monkeypatch.setattr(RunRecorder, "record_round", record_round)


def kill_server_before_recording(monkeypatch, server_round: int) -> None:  # type: ignore[no-untyped-def]
    """Make the server die after round ``server_round``'s step, before it recorded the round (no checkpoint)."""
    from server.recorder import RunRecorder

    original = RunRecorder.record_round

    def record_round(self, record, arrays):  # type: ignore[no-untyped-def]
        if record.server_round == server_round:
            raise ServerKilled
        original(self, record, arrays)

    monkeypatch.setattr(RunRecorder, "record_round", record_round)
