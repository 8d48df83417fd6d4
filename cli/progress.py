"""Progress of a ``fedrec simulate`` run: a status line while things start, then rounds with ETA.

The rounds come from the run directory's ``metrics.jsonl`` (one line per completed
round, the run's commit point), polled while Flower runs, so the bar counts what
the run has durably done. On a terminal this is a rich progress bar (spinner,
phase, bar, rounds done, elapsed, ETA); elsewhere (CI, a pipe) plain lines: one
per phase and one per completed round with elapsed time and ETA.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import TimeRemainingColumn as _Remaining

POLL_S = 0.5


def rounds_done(metrics: Path) -> int:
    """Rounds recorded in ``metrics.jsonl`` (the largest ``round``; 0 when none or unreadable)."""
    try:
        text = metrics.read_text()
    except OSError:
        return 0
    done = 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        value = record.get("round") if isinstance(record, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            done = max(done, value)
    return done


def eta_text(elapsed: float, done: int, remaining: int) -> str:
    """``ETA 1m05s`` from the mean time per completed round (``ETA ?`` before the first)."""
    if done <= 0:
        return "ETA ?"
    seconds = round(elapsed / done * remaining)
    minutes, secs = divmod(seconds, 60)
    return f"ETA {minutes}m{secs:02d}s" if minutes else f"ETA {secs}s"


class RunProgress:
    """Phase status and round progress of one run (a context manager).

    ``phase(text)`` shows what is happening now ("starting the SuperLink", ...);
    rounds advance by themselves from ``metrics`` once :meth:`watch` is called.
    ``print_line`` writes a line above the bar (Flower's progress lines).
    """

    def __init__(
        self,
        console: Console,
        *,
        total_rounds: int,
        metrics: Path,
        first_round: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.total = total_rounds
        self.metrics = metrics
        self.first = first_round  # rounds already done (a resumed run)
        self.clock = clock
        self.live = console.is_terminal
        self._done = first_round
        self._started = clock()
        self._rounds_started: float | None = None
        self._first_at: float | None = None  # when the first round(s) of this run were seen done
        self._first_done = first_round
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> RunProgress:
        if self.live:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rounds"),
                TimeElapsedColumn(),
                _Remaining(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("starting", total=self.total, completed=self.first)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2 * POLL_S)
        self.poll()
        if self._progress is not None:
            self._progress.stop()

    def phase(self, text: str) -> None:
        """Show the current phase (a status line)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text)
        else:
            self.console.print(f"… {text}", highlight=False, markup=False)

    def print_line(self, line: str) -> None:
        """A line of output above the bar (plain text, no markup)."""
        self.console.out(line.rstrip("\n"), highlight=False)

    def watch(self) -> None:
        """Start polling ``metrics`` for completed rounds (a daemon thread)."""
        self._rounds_started = self.clock()
        self._thread = threading.Thread(target=self._run, name="fedrec-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def poll(self) -> int:
        """Read ``metrics`` once; report rounds completed since the last poll. Returns rounds done."""
        done = min(rounds_done(self.metrics), self.total)
        if done <= self._done:
            return self._done
        self._done = done
        now = self.clock()
        if self._first_at is None:
            # The first round also pays for Ray's and the clients' start-up: later
            # rounds' ETA is measured from its end.
            self._first_at, self._first_done = now, done
        if self._progress is not None and self._task is not None:
            text = "done" if done >= self.total else f"round {done + 1}/{self.total}"
            self._progress.update(self._task, completed=done, description=text)
        else:
            start = self._rounds_started if self._rounds_started is not None else self._started
            elapsed = now - start
            if done == self._first_done or self._first_at is None:
                eta = eta_text(elapsed, done - self.first, self.total - done)
            else:
                eta = eta_text(now - self._first_at, done - self._first_done, self.total - done)
            self.console.print(
                f"round {done}/{self.total} done, {elapsed:.0f} s elapsed, {eta}", highlight=False, markup=False
            )
        return done
