"""The run directory's one writer: config, per-round metrics and checkpoints, ledgers, report."""

from __future__ import annotations

import json
import os
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from common.errors import ConfigError
from common.privacy.events import PrivacyRelease
from common.round_record import RoundRecord
from common.rundir import RunDir, RunDirError
from common.storage import atomic_write_bytes, atomic_write_json, load_arrays, save_arrays
from common.versions import library_versions
from server import plots, validation
from server.ledger import RunLedgers
from server.report import render_privacy, render_report

# Settings a resumed run may change; every other one must equal the original run's.
RESUME_FREE_KEYS = frozenset({"resume", "num-server-rounds", "run-dir", "state-root"})
# eval.fused: a round trained and checkpointed whose evaluation comes with the next round's message.
PENDING_ROUND = "pending-round.json"


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a resumed run continues: its id, last completed round and shared model."""

    run_uid: str
    last_round: int
    arrays: ArrayRecord  # the model after ``last_round``, or after ``pending`` when there is one
    pending: RoundRecord | None = None  # eval.fused: the next round, trained and checkpointed, not evaluated


def _load_checkpoint(path: Path, like: ArrayRecord | None) -> ArrayRecord:
    """A checkpoint to resume from, refused (naming the file) unless it is a usable shared model.

    It must load, hold only finite values and, when ``like`` is given, have exactly
    its parameter names, shapes and dtypes.
    """
    if not path.exists():
        raise ConfigError(f"resume: checkpoint {path} is missing")
    try:
        arrays = load_arrays(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"resume: checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from None
    shape_problem = validation.arrays_problem(arrays, like) if like is not None else None
    problem = shape_problem or validation.nonfinite_problem(arrays)
    if problem is not None:
        raise ConfigError(f"resume: checkpoint {path} is not a usable shared model: {problem}")
    return arrays


class RunRecorder:
    """Writes one run's directory; every file is written atomically or appended synced."""

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        self.rounds: list[RoundRecord] = []
        self.ledgers: RunLedgers | None = None  # set by start() / resume()
        self.run_uid = ""

    def start(self, run_config: Mapping[str, Any]) -> None:
        """Create the directory and write the resolved config with library versions.

        Raises
        ------
        FileExistsError
            If the directory already holds a run's metrics (nothing is overwritten).
        """
        if self.run_dir.holds_run():
            raise FileExistsError(
                f"{self.run_dir.path} already holds a run ({self.run_dir.metrics.name} exists); "
                "choose another run directory"
            )
        self.run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
        self.run_uid = uuid.uuid4().hex
        atomic_write_json(
            self.run_dir.config,
            {"run-config": dict(run_config), "run-uid": self.run_uid, "versions": library_versions()},
        )
        self.ledgers = RunLedgers(self.run_dir)

    def resume(self, run_config: Mapping[str, Any]) -> ResumePoint:
        """Reopen a run directory to continue after its last completed round.

        A round is complete once its line is in ``metrics.jsonl`` (its checkpoint and
        ledger commit are written before it). Settings that shape the model, data or
        privacy must equal the original run's; ``num-server-rounds`` may grow.

        Raises
        ------
        ConfigError
            If the directory is not a resumable run or its settings differ.
        """
        try:
            saved = self.run_dir.read_config()
            self.rounds = self.run_dir.read_rounds()
        except RunDirError as exc:
            raise ConfigError(f"resume: {exc}") from None
        original, self.run_uid = saved.run_config, saved.run_uid
        changed = sorted(
            k for k in set(original) | set(run_config)
            if k not in RESUME_FREE_KEYS and original.get(k) != run_config.get(k)
        )
        if changed:
            diffs = ", ".join(f"{k}: {original.get(k)!r} -> {run_config.get(k)!r}" for k in changed)
            raise ConfigError(f"resume: settings differ from the run in {self.run_dir.path}: {diffs}")
        last = self.rounds[-1].server_round if self.rounds else 0
        initial = _load_checkpoint(self.run_dir.initial_model, None)
        pending = self._pending(last)
        at = pending.server_round if pending is not None else last
        arrays = _load_checkpoint(self.run_dir.checkpoint(at), initial) if at else initial
        self.ledgers = RunLedgers(self.run_dir)
        return ResumePoint(self.run_uid, last, arrays, pending)

    def _pending(self, last: int) -> RoundRecord | None:
        """The round after ``last`` if it was trained and checkpointed awaiting its evaluation (eval.fused)."""
        path = self.run_dir.path / PENDING_ROUND
        if not path.exists():
            return None
        try:
            record = RoundRecord.from_json(json.loads(path.read_text()))
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"resume: {path} is unreadable ({type(exc).__name__}: {exc})") from None
        return record if record.server_round == last + 1 else None  # an older one was completed

    def record_trained(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        """eval.fused: a round trained whose evaluation comes with the next message; checkpoint it.

        The checkpoint, then the pending record (atomically); resume continues after
        this round, sending its evaluation with the next round's training. The round
        is complete (ledger commit, ``metrics.jsonl`` line) only in :meth:`record_round`.
        """
        save_arrays(self.run_dir.checkpoint(record.server_round), arrays)
        atomic_write_json(self.run_dir.path / PENDING_ROUND, record.to_json())

    def record_release(self, release: PrivacyRelease) -> None:
        """Write one of the server's releases (central DP) to its ledger at once.

        Every release counts on resume, also one of a round interrupted before it
        completed (its noisy aggregate may have been sent): never under-count.
        """
        if self.ledgers is None:
            raise RuntimeError("record_release before start() or resume()")
        self.ledgers.record_server(release)

    def record_round(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        """Record a completed round: checkpoint, ledger commit, metrics line, state."""
        # Order matters for resume: checkpoint and ledger commit first; the metrics line
        # marks the round complete; state.json last.
        save_arrays(self.run_dir.checkpoint(record.server_round), arrays)
        state: dict[str, Any] = {"last-completed-round": record.server_round}
        if self.ledgers is not None:
            self.ledgers.commit_round(record.server_round)
            state["ledger"] = self.ledgers.anchor()
        self.rounds.append(record)
        with self.run_dir.metrics.open("a") as f:
            f.write(json.dumps(record.to_json(), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        atomic_write_json(self.run_dir.state, state)

    def finish(self, arrays: ArrayRecord, k: int, privacy_mode: str = "none", stop_reason: str | None = None) -> None:
        """Save the final model and write ``report.md`` with its plots."""
        save_arrays(self.run_dir.final_model, arrays)
        last = self.rounds[-1].server_round if self.rounds else 0
        state: dict[str, Any] = {"last-completed-round": last, "finished": True, "stop-reason": stop_reason}
        if self.ledgers is not None:
            state["ledger"] = self.ledgers.anchor()
        atomic_write_json(self.run_dir.state, state)
        plots.plot_rounds(self.rounds, self.run_dir.metrics_plot, k)
        text = render_report(self.rounds, k, self.run_dir.metrics_plot.name, run_dir=self.run_dir)
        if stop_reason:
            text += f"\n**The run stopped early:** {stop_reason}.\n"
        if privacy_mode != "none":
            plots.plot_privacy(self.rounds, self.run_dir.privacy_plot)
            text += "\n" + render_privacy(
                self.rounds, privacy_mode, self.run_dir.privacy_plot.name, run_dir=self.run_dir
            )
        atomic_write_bytes(self.run_dir.report, text.encode())
