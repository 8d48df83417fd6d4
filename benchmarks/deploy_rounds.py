"""Round time of a real deployment on loopback: fedrec against a bare no-op ClientApp (Flower's floor).

Every run starts a fresh :class:`deployment.local.LocalDeployment` (TLS, SuperNode
authentication, one SuperNode per silo on 127.0.0.1, free-picked ports) and runs an
app for ``--rounds`` rounds; a round's time is the ServerApp's own (``seconds`` in
``metrics.jsonl``), round 1 left out (it fetches the app bundle and loads data).

Rows, for 1 and 3 SuperNodes:

- **fedrec**, Flower's settings (``--flower-defaults``: a fresh ``flwr-clientapp`` per
  message) and fedrec's (``deploy local``'s default: one persistent ClientApp process
  per SuperNode, :mod:`deployment.clientapp_host`);
- **bare**: a ClientApp that replies at once with the array it got (~0.8 MB each way, the
  size of fedrec's default MF update) and a ServerApp that does fedrec's two exchanges
  per round (train, then evaluate) and polls for replies every 0.1 s as fedrec's does:
  what any app pays on this transport. Run per message and persistent; one exchange
  per round shows what the second exchange costs;
- **bare, SuperNode idle poll 0.1 s (patched)**: the SuperNode's hard-coded 3 s idle poll
  capped at 0.1 s in the SuperNode process (measurement only; never used by
  ``deploy local``): what that constant costs;
- **fedrec, fused** (``eval.fused = true``, ``deploy local``'s default since it exists):
  one exchange per round, round r's evaluation in round r+1's train message; its floor
  is the bare ClientApp with one exchange per round. A fused run's last round has an
  evaluate exchange of its own, so the table also gives the steady rounds (2..R−1).

    python -m benchmarks.deploy_rounds --rounds 4 --repeats 3
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.latency import _PATCHED_SUPERNODE
from deployment.launcher import REPO
from deployment.local import LocalDeployment
from deployment.tuning import FLOWER_DEFAULTS, TUNED, Tuning

BARE_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "bare"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedrec-benchmarks"

[tool.flwr.app.components]
serverapp = "bare_app:server"
clientapp = "bare_app:client"

[tool.flwr.app.config]
num-server-rounds = 4
run-dir = ""
min-nodes = 1
exchanges = 2
payload-floats = 200000
"""

BARE_APP = '''\
"""A no-op Flower app: the floor of a deployment round (benchmarks.deploy_rounds)."""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()


def _echo(msg: Message) -> Message:
    return Message(RecordDict({"arrays": msg.content.array_records["arrays"]}), reply_to=msg)


@client.train()
def train(msg: Message, context: Context) -> Message:
    return _echo(msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _echo(msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out = Path(str(cfg["run-dir"])) / "metrics.jsonl"
    kinds = [MessageType.TRAIN, MessageType.EVALUATE][: int(cfg["exchanges"])]
    payload = np.zeros(int(cfg["payload-floats"]), dtype=np.float32)
    while len(nodes := sorted(grid.get_node_ids())) < int(cfg["min-nodes"]):
        time.sleep(0.1)
    for rnd in range(1, int(cfg["num-server-rounds"]) + 1):
        start = time.perf_counter()
        for kind in kinds:
            content = RecordDict({"arrays": ArrayRecord({"x": Array(payload)}),
                                  "config": ConfigRecord({"round": rnd})})
            messages = [Message(content, dst_node_id=n, message_type=kind, group_id=str(rnd)) for n in nodes]
            pending = set(grid.push_messages(messages))
            while pending:
                pending -= {r.metadata.reply_to_message_id for r in grid.pull_messages(pending)}
                if pending:
                    time.sleep(0.1)
        with out.open("a") as f:
            f.write(json.dumps({"round": rnd, "seconds": time.perf_counter() - start}) + "\\n")
'''


@dataclass(frozen=True, slots=True)
class Row:
    """One row of the table: an app, its settings, how many repeats."""

    name: str
    app: str  # "fedrec" | "bare"
    tuning: Tuning
    run_config: dict[str, object] = field(default_factory=dict)
    patch_supernode: bool = False
    repeats: int | None = None  # None: --repeats
    floor: int = 3  # the row (index in rows()) this one is compared with


@dataclass(frozen=True, slots=True)
class Measurement:
    """Round times of one run."""

    seconds: tuple[float, ...]
    load: float  # 1-minute load average at the end of the run

    @property
    def per_round(self) -> float:
        """Mean seconds per round, round 1 left out."""
        return statistics.fmean(self.seconds[1:] or self.seconds)

    @property
    def steady(self) -> float:
        """Mean seconds of rounds 2..R-1 (neither round 1 nor the last round)."""
        return statistics.fmean(self.seconds[1:-1] or self.seconds[1:] or self.seconds)


class _Deployment(LocalDeployment):
    """A LocalDeployment whose SuperNodes may run with the idle poll capped (measurement only)."""

    def __init__(self, *args: object, patch_supernode: bool, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.patch_supernode = patch_supernode

    def supernode_command(self, index: int, **kwargs: object) -> list[str]:  # type: ignore[override]
        args = super().supernode_command(index, **kwargs)  # type: ignore[arg-type]
        return [sys.executable, "-c", _PATCHED_SUPERNODE, *args[1:]] if self.patch_supernode else args


def rows(slow_repeats: int) -> list[Row]:
    """The table's rows (per silo count)."""
    return [
        Row("fedrec, Flower's settings (flwr-clientapp per message)", "fedrec", FLOWER_DEFAULTS,
            repeats=slow_repeats),
        Row("fedrec, persistent ClientApp, 2 exchanges per round (eval.fused=false)", "fedrec", TUNED,
            run_config={"eval.fused": False}),
        Row("bare ClientApp, flwr-clientapp per message", "bare", FLOWER_DEFAULTS, repeats=slow_repeats),
        Row("bare ClientApp, persistent (the floor for fedrec's setup)", "bare", TUNED),
        Row("bare ClientApp, persistent, 1 exchange per round (the floor of fused rounds)", "bare", TUNED,
            run_config={"exchanges": 1}),
        Row("bare ClientApp, persistent, SuperNode idle poll 0.1 s (patched)", "bare", TUNED,
            patch_supernode=True, repeats=slow_repeats),
        Row("fedrec, `deploy local` default (persistent ClientApp, eval.fused=true: 1 exchange per round)",
            "fedrec", TUNED, run_config={"eval.fused": True}, floor=4),
    ]


def bare_app(directory: Path) -> Path:
    """Write the no-op app into ``directory``; return it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(BARE_PYPROJECT)
    (directory / "bare_app.py").write_text(BARE_APP)
    return directory


def measure(row: Row, work: Path, *, silos: int, rounds: int, bare: Path) -> Measurement:
    """One run of ``row`` with ``silos`` SuperNodes."""
    work.mkdir(parents=True)
    run_dir = work / "run"
    config: dict[str, object] = {"num-server-rounds": rounds, "run-dir": str(run_dir), **row.run_config}
    if row.app == "fedrec" and silos < 2:
        config["strategy.min-nodes"] = silos
    if row.app == "bare":
        config["min-nodes"] = silos
    app_dir = REPO if row.app == "fedrec" else bare
    with _Deployment(run_dir, silos, tuning=row.tuning, patch_supernode=row.patch_supernode) as dep:
        rc = dep.run_app(config, app_dir=app_dir, on_line=lambda _line: None, timeout=1800)
    metrics = run_dir / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        raise RuntimeError(f"{row.name}: flwr run failed (exit code {rc}); see {run_dir / 'logs'}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    if len(records) != rounds:
        raise RuntimeError(f"{row.name}: {len(records)} of {rounds} rounds; see {run_dir / 'logs'}")
    return Measurement(tuple(float(r["seconds"]) for r in records), os.getloadavg()[0])


def table(results: dict[tuple[int, str], list[Measurement]], silo_counts: list[int], all_rows: list[Row]) -> str:
    """Markdown: per row and silo count, best s/round, steady rounds, ratio to its floor, every run, load."""
    lines = [
        "| setting | SuperNodes | s/round (best) | rounds 2..R−1 (best) | rounds/s | × floor (row) "
        "| runs (s/round) | load |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for silos in silo_counts:
        for row in all_rows:
            runs = results.get((silos, row.name))
            if not runs:
                continue
            floor_runs = results.get((silos, all_rows[row.floor].name))
            floor = min(m.per_round for m in floor_runs) if floor_runs else None
            best = min(m.per_round for m in runs)
            steady = min(m.steady for m in runs)
            ratio = f"{best / floor:.2f} ({row.floor})" if floor else "–"
            each = ", ".join(f"{m.per_round:.1f}" for m in runs)
            load = ", ".join(f"{m.load:.1f}" for m in runs)
            lines.append(
                f"| {row.name} | {silos} | {best:.1f} | {steady:.1f} | {1 / best:.3f} | {ratio} | {each} | {load} |"
            )
    return "\n".join(lines)


def main(
    rounds: Annotated[int, typer.Option(min=2, help="Rounds per run (round 1 not counted).")] = 4,
    repeats: Annotated[int, typer.Option(min=1, help="Runs of the main rows (best counts), interleaved.")] = 3,
    slow_repeats: Annotated[int, typer.Option(min=1, help="Runs of the context rows.")] = 1,
    silos: Annotated[list[int] | None, typer.Option(help="SuperNode counts (repeatable; default 1 and 3).")] = None,
    only: Annotated[list[int] | None, typer.Option(help="Row numbers to run (0-based; repeatable).")] = None,
    keep: Annotated[Path | None, typer.Option(help="Keep run directories here.")] = None,
) -> None:
    """Measure s/round per row and SuperNode count; print a markdown table."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # unwind: every deployment stopped
    all_rows = rows(slow_repeats)
    chosen = [all_rows[i] for i in only] if only else all_rows
    counts = silos or [1, 3]
    root = keep.resolve() if keep else Path(tempfile.mkdtemp(prefix="fedrec-deploy-rounds-"))
    bare = bare_app(root / "bare-app")
    results: dict[tuple[int, str], list[Measurement]] = {}
    started = time.perf_counter()
    try:
        for rep in range(max(r.repeats or repeats for r in chosen)):
            for n in counts:
                for i, row in enumerate(chosen):
                    if rep >= (row.repeats or repeats):
                        continue
                    m = measure(row, root / f"{rep}-{n}-{i}", silos=n, rounds=rounds, bare=bare)
                    results.setdefault((n, row.name), []).append(m)
                    print(
                        f"[{rep}] {n} SuperNodes, {row.name}: {m.per_round:.2f} s/round, {m.steady:.2f} steady "
                        f"(rounds: {', '.join(f'{s:.2f}' for s in m.seconds)}; load {m.load:.1f})",
                        flush=True,
                    )
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(
        f"TLS + node auth on 127.0.0.1, default fedrec run config (MF), {rounds} rounds per run; "
        f"s/round = the ServerApp's round time, mean of rounds 2..{rounds}, best of the runs listed; "
        f"× floor = against the row named (a bare persistent ClientApp with as many SuperNodes); load = 1-min load "
        f"average after each run ({os.cpu_count()} CPUs); total {time.perf_counter() - started:.0f} s"
    )
    print()
    print(table(results, counts, all_rows))


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    typer.run(main)
