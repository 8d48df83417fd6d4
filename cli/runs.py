"""What ``fedrec simulate``, ``deploy local`` and ``centralized`` share around a run."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import typer

from cli.output import console, err, fail, os_errors, print_privacy, print_rounds
from common.errors import ConfigError
from common.rundir import RunDir, RunDirError, default_run_dir


def choose_run_dir(run_dir: Path | None, label: str) -> RunDir:
    """``run_dir``, or ``runs/<time>-<label>``; absolute either way."""
    return RunDir(run_dir.resolve() if run_dir is not None else default_run_dir(label).resolve())


def refuse_existing_run(run: RunDir, hint: str) -> None:
    """Raise if ``run`` already holds rounds of a run (nothing may overwrite them)."""
    if run.holds_run():
        raise ConfigError(f"{run.path} already holds a run ({run.metrics.name} exists); {hint}")


@contextlib.contextmanager
def run_dir_session(run: RunDir) -> Iterator[None]:
    """Hold ``run``'s lock (creating the directory) for the whole command.

    Exits with code 2 and a clear message, no traceback, if another fedrec process
    holds the directory (naming its pid) or a file cannot be written inside (read-only
    or full disk: naming the file and the reason).
    """
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(run.locked())
        except RunDirError as e:
            fail(e)
        with os_errors(run.path):
            yield


def print_silo_evaluation(state_root: Path, k: int) -> None:
    """Under DP: the evaluation the silos kept for themselves, pooled (a simulation holds them all)."""
    from rich.table import Table

    from common.silo_reports import pooled_evaluation

    try:
        pooled = pooled_evaluation(state_root, k)
    except (OSError, ValueError) as e:
        err.print(f"[yellow]warning:[/] cannot read the silos' own reports: {e}")
        return
    if not pooled:
        return
    table = Table(
        title="fedrec: evaluation kept in the silos (not sent to the server under DP; "
        "pooled here because this simulation holds every silo)"
    )
    keys = [f"val-hr@{k}", f"test-hr@{k}", f"test-ndcg@{k}"]
    for col in ["round", "silos", *keys]:
        table.add_column(col, justify="right")
    for rnd, m in pooled.items():
        table.add_row(str(rnd), f"{m['silos']:.0f}", *(f"{m[key]:.4f}" if key in m else "-" for key in keys))
    console.print(table)


def add_silo_evaluation_to_report(run: RunDir, k: int) -> None:
    """A simulation holds every silo: its report.md also gets their kept evaluation, pooled."""
    from common.silo_reports import pooled_evaluation
    from server.report import append_silo_evaluation

    try:
        append_silo_evaluation(run, pooled_evaluation(run.silo_states, k), k)
    except (OSError, ValueError) as e:
        err.print(f"[yellow]warning:[/] report.md: cannot add the silos' own evaluation: {e}")


def unwind_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so every Flower process we started is stopped."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def summarise_run(run: RunDir, rc: int, *, num_rounds: int, k: int, privacy_mode: str, logs: str) -> None:
    """Check what the run wrote and print its tables; exit 1 if it failed.

    ``logs`` says where to look when it failed (``full log: <file>``).
    """
    if rc != 0 or not run.holds_run():
        err.print(f"[bold red]error:[/] the Flower run failed (exit code {rc}); {logs}")
        raise typer.Exit(1)
    try:
        rounds_done = run.read_rounds()
        state = run.read_state()
    except RunDirError as e:
        fail(e, 1)
    stop_reason = state.stop_reason if state is not None else None
    if len(rounds_done) < num_rounds and not stop_reason:
        err.print(f"[bold red]error:[/] only {len(rounds_done)} of {num_rounds} rounds completed; {logs}")
        raise typer.Exit(1)
    print_rounds(rounds_done, k)
    if privacy_mode != "none":
        print_silo_evaluation(run.silo_states, k)
        add_silo_evaluation_to_report(run, k)
        print_privacy(rounds_done)
    if stop_reason:
        console.print(f"[bold yellow]stopped after round {len(rounds_done)}:[/] {stop_reason}")
    console.print(f"report: {run.report}")
