"""Hostile silos for evaluating fedrec's defences: simulation only, never a deployment path.

An attack wraps fedrec's real ClientApp: the attacking silo trains honestly, then
rewrites its training reply before it leaves (the in-process runtime serialises it
as the network would). The attack settings are not part of the app's run config, so
no ``flwr run`` — simulation on Ray or a deployment — can carry one; they reach only
:func:`run_attacked` (the robustness benchmark and tests).

Kinds (``strength`` = s), on the silo's update Δ = w_silo − w_sent:

``scale``             sends w + s·Δ (a boosted update)
``sign-flip``         sends w − s·Δ
``noise``             sends w_silo + N(0, s²) in every coordinate
``inflate-examples``  claims s × its FedAvg weight
``boost-item``        adds s to the bias of item ``item`` (targeted promotion)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from client import app as fedrec_client
from common import records
from common.errors import ConfigError
from common.run_config import Scalar
from simulations.inprocess import InProcessGrid

AttackKind = Literal["scale", "noise", "inflate-examples", "boost-item", "sign-flip"]
KINDS: tuple[str, ...] = ("scale", "noise", "inflate-examples", "boost-item", "sign-flip")
ITEM_BIAS = "item_bias.weight"


@dataclass(frozen=True, slots=True)
class AttackSettings:
    """Which silo attacks, how, how hard; ``item`` is the promoted item's row (boost-item)."""

    silo: int
    kind: AttackKind
    strength: float
    item: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"attack.kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.silo < 0:
            raise ConfigError(f"attack.silo: must be >= 0, got {self.silo}")
        if not np.isfinite(self.strength):
            raise ConfigError(f"attack.strength: must be finite, got {self.strength}")

    @classmethod
    def from_overrides(cls, values: Mapping[str, Scalar]) -> AttackSettings | None:
        """``attack.silo``/``attack.kind``/``attack.strength``/``attack.item`` overrides (None: no attack)."""
        known = {"attack.silo", "attack.kind", "attack.strength", "attack.item", "attack.seed"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown attack key {unknown[0]!r}; known: {', '.join(sorted(known))}")
        if not values:
            return None
        try:
            return cls(
                silo=int(values.get("attack.silo", 0)),
                kind=str(values["attack.kind"]),  # type: ignore[arg-type]
                strength=float(values.get("attack.strength", 1.0)),
                item=int(values.get("attack.item", 0)),
                seed=int(values.get("attack.seed", 0)),
            )
        except KeyError:
            raise ConfigError("attack.kind: missing (an attack needs a kind)") from None


def attack_reply(reply: Message, sent: ArrayRecord, attack: AttackSettings, rng: np.random.Generator) -> Message:
    """``reply`` as the attacking silo rewrites it (arrays and/or weight); other replies unchanged."""
    content = reply.content
    if reply.has_error() or records.ARRAYS not in content.array_records:
        return reply
    got = content.array_records[records.ARRAYS]
    arrays = {k: got[k].numpy().astype(np.float64) for k in got}
    base = {k: sent[k].numpy().astype(np.float64) for k in sent}
    if attack.kind == "scale":
        arrays = {k: base[k] + attack.strength * (arrays[k] - base[k]) for k in arrays}
    elif attack.kind == "sign-flip":
        arrays = {k: base[k] - attack.strength * (arrays[k] - base[k]) for k in arrays}
    elif attack.kind == "noise":
        arrays = {k: v + rng.normal(0.0, attack.strength, size=v.shape) for k, v in arrays.items()}
    elif attack.kind == "boost-item":
        if ITEM_BIAS not in arrays:
            raise ConfigError(f"attack.kind = boost-item needs a model with {ITEM_BIAS}")
        arrays[ITEM_BIAS] = arrays[ITEM_BIAS].copy()
        arrays[ITEM_BIAS].reshape(-1)[attack.item] += attack.strength
    content[records.ARRAYS] = ArrayRecord({k: Array(v.astype(got[k].numpy().dtype)) for k, v in arrays.items()})
    if attack.kind == "inflate-examples":
        metrics = dict(content.metric_records[records.METRICS])
        metrics[records.NUM_EXAMPLES] = float(metrics[records.NUM_EXAMPLES]) * attack.strength  # type: ignore[arg-type]
        content[records.METRICS] = MetricRecord(metrics)
    return reply


def attacked_app(attack: AttackSettings) -> ClientApp:
    """fedrec's ClientApp, with silo ``attack.silo``'s training replies rewritten."""
    app = ClientApp()
    rng = np.random.default_rng(attack.seed)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = fedrec_client.train(msg, context)
        if int(context.node_config["partition-id"]) != attack.silo:
            return reply
        return attack_reply(reply, msg.content.array_records[records.ARRAYS], attack, rng)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return fedrec_client.evaluate(msg, context)

    return app


def run_attacked(
    run_config: Mapping[str, Scalar], num_nodes: int, attack: AttackSettings | None
) -> tuple[InProcessGrid, Path]:
    """Run a federation in-process, with ``attack`` (if any) in one silo; return the grid and run directory."""
    from server.federation import run_federation

    app = fedrec_client.app if attack is None else attacked_app(attack)
    grid = InProcessGrid(app, run_config, num_nodes)
    return grid, run_federation(grid, run_config)


def main(argv: list[str] | None = None) -> int:
    """``python -m simulations.attacks --silos 5 -c attack.kind=boost-item -c attack.strength=25 [-c key=value ...]``.

    One in-process federation with one hostile silo; every other ``-c`` is a run-config
    override as for ``fedrec simulate``. Prints the run directory and the silos the
    anomaly report flagged. Exit code 2 on bad settings.
    """
    import argparse

    from common.config import AppConfig
    from common.errors import FedrecError
    from common.run_config import collect_overrides, load_default_run_config, merge_overrides
    from common.rundir import RunDir

    parser = argparse.ArgumentParser(prog="python -m simulations.attacks", description=main.__doc__)
    parser.add_argument("--silos", type=int, default=5)
    parser.add_argument("-c", "--config", action="append", default=[], help="key=value (attack.* or run config)")
    args = parser.parse_args(argv)
    try:
        if args.silos < 1:
            raise ConfigError(f"--silos must be >= 1, got {args.silos}")
        values = collect_overrides(args.config, {})
        attack = AttackSettings.from_overrides({k: v for k, v in values.items() if k.startswith("attack.")})
        if attack is not None and attack.silo >= args.silos:
            raise ConfigError(f"attack.silo: {attack.silo} is not one of the {args.silos} silos")
        run_config = merge_overrides(
            load_default_run_config(), {k: v for k, v in values.items() if not k.startswith("attack.")}
        )
        AppConfig.from_run_config(run_config)
        _, path = run_attacked(run_config, args.silos, attack)
    except FedrecError as exc:
        print(f"error: {exc}")
        return 2
    run = RunDir(path)
    flagged = sorted(
        {(s.partition_id, s.node) for r in run.read_rounds() for s in r.silos if s.outlier or s.rejected}, key=str
    )
    print(f"run directory: {run.path}")
    print("flagged silos (partition, node): " + (", ".join(map(str, flagged)) or "none"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
