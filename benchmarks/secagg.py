"""Cost of secure aggregation per round vs a plain sum, over fedrec's in-process Grid.

Each silo holds one vector the size of ML-100K's shared MF model (1682 items × 32
dimensions + 1682 item biases + 1 global bias = 55,507 floats). "plain" is the upload a
round already does without secure aggregation: each silo replies its float32 vector and
the server adds them. "secagg" is :func:`server.secagg.secure_sum` through
:func:`client.secagg.handle` (4 stages, uint32 masked vectors). Training and the model
broadcast are the same in both and left out. Bytes are the protobuf-serialised messages
(what crosses the network); seconds are wall and CPU time of the whole process (server
and every silo run in it one after the other), median over ``--rounds``.

    python -m benchmarks.secagg --silos 5 --silos 20 --rounds 3
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from typing import Annotated

import numpy as np
import torch
import typer
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_to_proto

from client import secagg as client_secagg
from common.secagg.quantize import QuantSpec
from server.secagg import secure_sum
from simulations.inprocess import InProcessGrid

DIM = 1682 * 32 + 1682 + 1

bench_app = ClientApp()


@bench_app.train()
def plain_upload(msg: Message, context: Context) -> Message:
    """Reply the staged vector in the clear, as float32 (what a plain FedAvg round uploads)."""
    vector = context.state.array_records[client_secagg.STATE_INPUT]["vector"].numpy().astype(np.float32)
    return Message(RecordDict({"arrays": ArrayRecord({"update": Array(vector)})}), reply_to=msg)


@bench_app.query(client_secagg.ACTION)
def secure(msg: Message, context: Context) -> Message:
    return client_secagg.handle(msg, context, vector_source=_peek)


def _peek(context: Context, server_round: int) -> np.ndarray:
    return context.state.array_records[client_secagg.STATE_INPUT]["vector"].numpy()


class CountingGrid(InProcessGrid):
    """Counts serialised bytes both ways and CPU seconds spent inside the silos."""

    def __init__(self, num_nodes: int, drop_node: int | None = None) -> None:
        super().__init__(bench_app, {}, num_nodes)
        self.down = self.up = 0
        self.client_cpu = 0.0
        self.drop_node = drop_node

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        kept = []
        for m in messages:
            if m.metadata.dst_node_id == self.drop_node and m.content.config_records.get("secagg", {}).get("stage") in (
                "collect",
                "unmask",
            ):
                continue  # this silo stops answering after sharing keys
            self.down += message_to_proto(m).ByteSize()
            kept.append(m)
        return super().push_messages(kept)

    def _run_node(self, wire: Message) -> Message:
        start = time.process_time()
        reply = super()._run_node(wire)
        self.client_cpu += time.process_time() - start
        self.up += message_to_proto(reply).ByteSize()
        return reply


def _round(mode: str, silos: int, server_round: int, drop: bool) -> dict[str, float]:
    grid = CountingGrid(silos, drop_node=2 if drop else None)
    rng = np.random.default_rng(server_round)
    vectors = {n: rng.normal(0.0, 0.01, DIM) for n in grid.contexts}
    for n, context in grid.contexts.items():
        client_secagg.stage_input(context, server_round, vectors[n])
    wall, cpu = time.perf_counter(), time.process_time()
    if mode == "plain":
        msgs = [
            Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}), dst_node_id=n,
                    message_type="train", group_id=str(server_round))
            for n in grid.contexts
        ]  # fmt: skip
        total = np.zeros(DIM, dtype=np.float64)
        for reply in grid.send_and_receive(msgs):
            total += reply.content.array_records["arrays"]["update"].numpy()
        error = float(np.abs(total - sum(vectors.values())).max())
    else:
        quant = QuantSpec(1.0, 32, silos)
        out = secure_sum(grid, list(grid.contexts), quant=quant, vector_length=DIM, server_round=server_round)
        error = float(np.abs(out.total - sum(vectors[n] for n in out.survivors)).max())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "wall": wall,
        "cpu": cpu,
        "silo_cpu": grid.client_cpu / silos,
        "server_cpu": cpu - grid.client_cpu,
        "up": grid.up / silos,
        "down": grid.down / silos,
        "total": grid.up + grid.down,
        "error": error,
    }


def main(
    silos: Annotated[list[int], typer.Option(help="Numbers of silos (repeat the option)")] = [5, 20],  # noqa: B006
    rounds: Annotated[int, typer.Option(help="Rounds measured per row (median)")] = 3,
) -> None:
    torch.set_num_threads(1)
    print(f"vector: {DIM:,} coordinates (ML-100K MF, d=32, with biases); rounds per row: {rounds}")
    header = (
        f"{'silos':>5} {'mode':<16} {'wall s':>7} {'CPU s':>7} {'server CPU s':>12} {'CPU s/silo':>10} "
        f"{'up kB/silo':>10} {'down kB/silo':>12} {'total MB':>9} {'bytes x plain':>13} {'max |err|':>10}"
    )
    print(header)
    print("-" * len(header))
    for s in silos:
        plain_total = None
        for mode, drop in (("plain", False), ("secagg", False), ("secagg, 1 drops", True)):
            rows = [_round("plain" if mode == "plain" else "secagg", s, r, drop) for r in range(1, rounds + 1)]
            med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
            plain_total = plain_total or med["total"]
            print(
                f"{s:>5} {mode:<16} {med['wall']:>7.2f} {med['cpu']:>7.2f} {med['server_cpu']:>12.2f} "
                f"{med['silo_cpu']:>10.3f} {med['up'] / 1e3:>10.1f} {med['down'] / 1e3:>12.1f} "
                f"{med['total'] / 1e6:>9.2f} {med['total'] / plain_total:>13.2f} {med['error']:>10.2e}"
            )


if __name__ == "__main__":
    typer.run(main)
