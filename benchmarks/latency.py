"""Seconds per round of a real deployment on loopback: Flower's defaults vs tuned settings.

Every setting starts a fresh :class:`deployment.local.LocalDeployment` (TLS, node
auth, one SuperNode per silo on 127.0.0.1), runs the default app for ``--rounds``
rounds and reads the ServerApp's own round timings from ``metrics.jsonl``. Round 1
is left out of the mean (it fetches the FAB and builds each silo's data).

Rows marked "patched" are not options: one caps the SuperNode's hard-coded 3 s idle
poll (flwr 1.41) at 0.1 s, one puts back the 3 s reply poll of Flower's
``Grid.send_and_receive`` that fedrec's ServerApp replaced with a 0.1 s poll; they show
what those waits cost. ``deploy local`` never uses them.

    python -m benchmarks.latency --silos 3 --rounds 4

Every row here runs Flower's ``flwr-clientapp`` per message; ``benchmarks.deploy_rounds``
measures ``deploy local``'s persistent ClientApps against a bare ClientApp's floor.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from deployment.launcher import REPO
from deployment.local import LocalDeployment
from deployment.tuning import FLOWER_DEFAULTS, Tuning

# Cap the sleeps of one Flower module at 0.1 s (measurement only).
_CAP_SLEEP = (
    "import time as _time, types as _types\n"
    "def _capped(seconds): _time.sleep(min(seconds, 0.1))\n"
    "{module}.time = _types.SimpleNamespace(time=_time.time, sleep=_capped)\n"
)
_PATCHED_SUPERNODE = (
    "import sys\n"
    "import flwr.supernode.start_client_internal as m\n"
    + _CAP_SLEEP.format(module="m")
    + "from flwr.supernode.cli import flower_supernode\n"
    "sys.argv[0] = 'flower-supernode'\n"
    "sys.exit(flower_supernode())\n"
)
_PATCHED_GRID = (
    "\n\n# benchmarks.latency: poll for replies every 3 s, as Flower's Grid loop does.\n"
    "if MeteredGrid.__init__.__defaults__ != (0.1,):\n"
    "    raise RuntimeError('benchmarks.latency: MeteredGrid(grid, poll_interval=0.1) changed')\n"
    "MeteredGrid.__init__.__defaults__ = (3.0,)\n"
)


@dataclass(frozen=True, slots=True)
class Setting:
    """One row of the table."""

    name: str
    tuning: Tuning
    run_config: dict[str, object] = field(default_factory=dict)
    patch_grid: bool = False
    patch_supernode: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Measurement:
    """Round timings of one run of one setting."""

    setting: str
    seconds: tuple[float, ...]  # per round, as the ServerApp measured them
    wall: float  # `flwr run` start to end
    load: float  # 1-minute load average at the end of the run (other users' work too)

    @property
    def per_round(self) -> float:
        """Mean seconds per round, round 1 excluded (when there is more than one)."""
        later = self.seconds[1:] or self.seconds
        return statistics.fmean(later)


class _BenchDeployment(LocalDeployment):
    """A LocalDeployment whose SuperNodes may run patched, or with extra env vars."""

    def __init__(self, *args: object, setting: Setting, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.setting = setting

    def supernode_command(self, index: int, **kwargs: object) -> list[str]:  # type: ignore[override]
        args = super().supernode_command(index, **kwargs)  # type: ignore[arg-type]
        if self.setting.patch_supernode:
            args = [sys.executable, "-c", _PATCHED_SUPERNODE, *args[1:]]
        return args

    def _env(self, flwr_home: Path, *, superlink: bool = False) -> dict[str, str]:
        return {**super()._env(flwr_home, superlink=superlink), **self.setting.extra_env}


def settings(rounds: int) -> list[Setting]:
    """The rows: Flower's defaults, then one change each (patched rows: not options)."""
    return [
        Setting("Flower defaults (subprocess isolation, SuperExec poll 1 s)", FLOWER_DEFAULTS),
        Setting("SuperExec poll 0.1 s (FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1)", Tuning(0.1)),
        Setting("telemetry off (FLWR_TELEMETRY_ENABLED=0)", Tuning(telemetry=False)),
        Setting(
            "SuperNode --isolation process (own flower-superexec per node)",
            Tuning(supernode_isolation="process"),
        ),
        Setting(
            f"eval.every={rounds} (fedrec run config: evaluate only in the last round)",
            FLOWER_DEFAULTS,
            run_config={"eval.every": rounds},
        ),
        Setting(
            "ServerApp reply poll 3 s (Flower's Grid loop; fedrec polls 0.1 s) (patched)",
            FLOWER_DEFAULTS,
            patch_grid=True,
        ),
        Setting(
            "SuperNode idle poll 0.1 s instead of 3 s (patched, not an option)",
            FLOWER_DEFAULTS,
            patch_supernode=True,
        ),
    ]


def patched_app(directory: Path) -> Path:
    """A copy of the app whose ServerApp polls for replies every 3 s (Flower's loop)."""
    app = directory / "app"
    for package in ("common", "client", "server"):
        shutil.copytree(
            REPO / package, app / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy2(REPO / "pyproject.toml", app / "pyproject.toml")
    grid = app / "server" / "metered_grid.py"
    grid.write_text(grid.read_text() + _PATCHED_GRID)
    return app


def measure(
    setting: Setting,
    work: Path,
    *,
    silos: int,
    rounds: int,
    overrides: dict[str, object],
    on_line: Callable[[str], None] | None = None,
) -> Measurement:
    """Run the app once under ``setting``; return the ServerApp's round timings."""
    work.mkdir(parents=True)
    app_dir = patched_app(work) if setting.patch_grid else REPO
    run_dir = work / "run"
    run_config = {**overrides, "num-server-rounds": rounds, **setting.run_config,
                  "run-dir": str(run_dir)}
    with _BenchDeployment(run_dir, silos, tuning=setting.tuning, setting=setting) as dep:
        start = time.perf_counter()
        rc = dep.run_app(run_config, app_dir=app_dir, on_line=on_line or (lambda _line: None))
        wall = time.perf_counter() - start
    metrics = run_dir / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        raise RuntimeError(f"{setting.name}: flwr run failed (exit code {rc}); see {run_dir / 'logs'}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    if len(records) != rounds:
        raise RuntimeError(f"{setting.name}: {len(records)} of {rounds} rounds; see {run_dir / 'logs'}")
    return Measurement(
        setting.name, tuple(float(r["seconds"]) for r in records), wall, os.getloadavg()[0]
    )


def table(results: list[list[Measurement]]) -> str:
    """Markdown table: setting, s/round, ratio to the first row, every run and its load.

    s/round is the best (lowest) run of a setting: other jobs on the machine only ever
    add time, so the least-disturbed run is the closest to the setting's own cost.
    """
    base = min(m.per_round for m in results[0])
    lines = [
        "| setting | s/round | ratio to Flower defaults | median s/round | runs (s/round) | load |",
        "|---|---:|---:|---:|---|---|",
    ]
    for runs in results:
        best = min(m.per_round for m in runs)
        median = statistics.median(m.per_round for m in runs)
        each = ", ".join(f"{m.per_round:.1f}" for m in runs)
        load = ", ".join(f"{m.load:.1f}" for m in runs)
        lines.append(
            f"| {runs[0].setting} | {best:.1f} | {best / base:.2f} | {median:.1f} | {each} | {load} |"
        )
    return "\n".join(lines)


def main(
    silos: Annotated[int, typer.Option(min=1, help="SuperNodes (one per silo).")] = 3,
    rounds: Annotated[int, typer.Option(min=2, help="Rounds per run (round 1 not counted).")] = 4,
    repeats: Annotated[int, typer.Option(min=1, help="Runs per setting, interleaved.")] = 1,
    only: Annotated[
        list[int] | None, typer.Option(help="Row numbers to run (0-based; repeatable).")
    ] = None,
    config: Annotated[
        list[str] | None, typer.Option("--config", "-c", help="Run-config override key=value.")
    ] = None,
    keep: Annotated[Path | None, typer.Option(help="Keep run directories here.")] = None,
) -> None:
    """Measure s/round per setting and print a markdown table."""
    from common.run_config import parse_override

    # SIGTERM unwinds like Ctrl-C, so every deployment's processes are stopped.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    overrides: dict[str, object] = dict(parse_override(c) for c in config or [])
    rows = settings(rounds)
    chosen = [rows[i] for i in only] if only else rows
    if only and 0 not in only:
        chosen = [rows[0], *chosen]  # the ratio needs Flower's defaults
    root = keep.resolve() if keep else Path(tempfile.mkdtemp(prefix="fedrec-latency-"))
    results: list[list[Measurement]] = [[] for _ in chosen]
    started = time.perf_counter()
    try:
        for rep in range(repeats):
            for i, setting in enumerate(chosen):
                m = measure(setting, root / f"{rep}-{i}", silos=silos, rounds=rounds, overrides=overrides)
                results[i].append(m)
                rounds_text = ", ".join(f"{s:.1f}" for s in m.seconds)
                print(
                    f"[{rep}] {setting.name}: {m.per_round:.1f} s/round (rounds: {rounds_text}; "
                    f"load {m.load:.1f})",
                    flush=True,
                )
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(
        f"{silos} SuperNodes, TLS + node auth on 127.0.0.1, {rounds} rounds, default model "
        f"and data{' + ' + ' '.join(config or []) if config else ''}; s/round = ServerApp's "
        f"round time, mean of rounds 2..{rounds}, best of {repeats} run(s) interleaved; "
        f"load = 1-min load average after each run ({os.cpu_count()} CPUs); "
        f"total {time.perf_counter() - started:.0f} s"
    )
    print()
    print(table([r for r in results if r]))


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    typer.run(main)
