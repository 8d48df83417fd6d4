"""A silo's durable state on its own disk: what must survive a SuperNode restart.

Under ``<state-dir>/<run-uid>/`` (one directory per run, so a new run never
inherits an old run's budget or embeddings):

``user-params.npz``   users' private parameters (embeddings, biases)
``accountant.json``   the privacy accountant (mechanism + every use so far)
``ledger.jsonl``      the silo's privacy ledger (append-only, hash-chained)
``last-reply.npz`` / ``last-reply.json``  the last training reply and its round
``progress.json``     the last round this silo trained
``silo.json``         which silo this is and the data/model settings it ran with
                      (so ``fedrec recommend`` / ``fedrec export`` can serve its rows)

Each file is replaced atomically (synced temp file + rename); the ledger is only
appended. Order of writes after a round: reply, parameters, accountant, ledger,
progress. A crash before the ledger line means the round's output was never sent,
so it is not counted and may be redone (an accountant written just before that crash
counts the unsent round: on restore it is cut back to the uses its ledger records);
once the ledger records a round (also when
the crash came before ``progress.json``: :meth:`SiloStore.last_round` reads both), a
repeat request for it (after a server resume) gets the saved reply, never a second
training: the budget is spent once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore import log

from common import records
from common.config import AppConfig, NodeConfig
from common.errors import FedrecError
from common.privacy.events import DP_EVALUATION, DP_SGD, silo_owner
from common.privacy.ledger import LedgerError, LedgerFile, releases
from common.storage import atomic_write_json, load_arrays, save_arrays

USER_PARAMS = "user-params.npz"
ACCOUNTANT = "accountant.json"
LEDGER = "ledger.jsonl"
LAST_REPLY_ARRAYS = "last-reply.npz"
LAST_REPLY_META = "last-reply.json"
PROGRESS = "progress.json"
SILO_INFO = "silo.json"


def fingerprint(arrays: ArrayRecord) -> str:
    """Short SHA-256 of an ArrayRecord's names, shapes and bytes (for logs and tests)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = arrays[name].numpy()
        h.update(f"{name}{arr.shape}{arr.dtype}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


class StateError(FedrecError):
    """A silo's durable state is unreadable or inconsistent."""


def state_dir(cfg: AppConfig, node: NodeConfig, run_dir: str = "") -> Path | None:
    """Where silo ``node`` keeps durable state.

    Node ``state-dir``, else ``<state-root>/silo-<id>``, else (neither set, e.g. a plain
    ``flwr run`` on the simulation runtime) ``<run-dir>/silos/silo-<id>`` with the
    server's run directory, so every completed run keeps its users' rows.
    """
    if node.state_dir:
        return Path(node.state_dir)
    if cfg.state_root:
        return Path(cfg.state_root) / f"silo-{node.partition_id}"
    if run_dir:
        return Path(run_dir) / "silos" / f"silo-{node.partition_id}"
    return None


@dataclass
class SiloStore:
    """Durable state of one silo in one run."""

    path: Path
    partition_id: int

    @classmethod
    def open(cls, cfg: AppConfig, node: NodeConfig, run_uid: str, run_dir: str = "") -> SiloStore | None:
        """The store of this run, or None when the silo has no state directory.

        With neither ``state-dir`` nor ``state-root`` the store lies under the server's
        ``run_dir``; if that cannot be created on this node (a remote silo), the silo
        runs without durable state and says so.
        """
        fallback = not node.state_dir and not cfg.state_root
        root = state_dir(cfg, node, run_dir)
        if root is None or not run_uid:
            return None
        path = root / run_uid
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if fallback:
                log(
                    WARNING,
                    "silo %d keeps no durable state: cannot create %s (%s); set state-dir",
                    node.partition_id,
                    path,
                    exc.strerror,
                )
                return None
            raise StateError(f"state-dir {root}: cannot create {path} ({exc.strerror})") from None
        store = cls(path, node.partition_id)
        store.write_info(cfg, node, run_uid)
        return store

    def write_info(self, cfg: AppConfig, node: NodeConfig, run_uid: str) -> None:
        """``silo.json`` (once per run): partition, data path, data and model settings."""
        if (self.path / SILO_INFO).exists():
            return
        atomic_write_json(
            self.path / SILO_INFO,
            {
                "partition-id": node.partition_id,
                "num-partitions": node.num_partitions,
                "data-path": node.data_path,
                "run-uid": run_uid,
                "seed": cfg.seed,
                "data": dataclasses.asdict(cfg.data),
                "model": dataclasses.asdict(cfg.model),
                "train": {"loss": cfg.train.loss, "l2": cfg.train.l2, "num-negatives": cfg.train.num_negatives},
                "privacy-mode": cfg.privacy.mode,
            },
        )

    # ------------------------------------------------------------ reading
    def last_round(self) -> int:
        """The last round this silo trained (0 when none).

        ``progress.json`` is written last after a round, so a silo stopped between its
        ledger line and its progress (a SuperNode killed, or Flower's SIGINT to a task
        whose run stopped) has a round its ledger already counts: the ledger's last
        DP-SGD round is taken too, so that round is resent, never trained twice.
        """
        progress = int(self._json(PROGRESS).get("last-round", 0)) if (self.path / PROGRESS).exists() else 0
        if not (self.path / LEDGER).exists():
            return progress
        return max([progress, *(int(e["round"]) for e in self.ledger().chain.events(DP_SGD))])

    def restore(self, state: RecordDict) -> bool:
        """Fill empty node state from disk (after a restart); True if anything was restored."""
        restored = False
        if records.STATE_USER_PARAMS not in state and (self.path / USER_PARAMS).exists():
            state[records.STATE_USER_PARAMS] = self._arrays(USER_PARAMS)
            restored = True
        if records.STATE_PRIVACY not in state.config_records and (self.path / ACCOUNTANT).exists():
            state[records.STATE_PRIVACY] = ConfigRecord(self._json(ACCOUNTANT))
            restored = True
        if records.STATE_LEDGER not in state.config_records and (self.path / LEDGER).exists():
            state[records.STATE_LEDGER] = ConfigRecord({records.LEDGER_LINES: self.ledger().chain.lines})
            restored = True
        if restored and (self.path / ACCOUNTANT).exists() and (self.path / LEDGER).exists():
            self._reconcile_accountant(state)
        return restored

    def _reconcile_accountant(self, state: RecordDict) -> None:
        """Make the restored accountant count exactly the uses its ledger records.

        The accountant is written before the ledger line after a round; a silo stopped
        between the two has an accountant with one use the ledger never recorded (the
        round's output was never sent, and the round is redone). The ledger is the
        record of what was released: the extra use is dropped, so the redone round is
        counted once. An accountant that does not extend its ledger's uses is refused.
        """
        from common.privacy.accounting import Accountant  # the DP stack only when a DP run restores

        on_disk = self._json(ACCOUNTANT)
        if "use-noise-multipliers" not in on_disk:  # not an accountant this code wrote
            return
        try:
            acc = Accountant.from_json(on_disk)
        except ValueError as exc:
            raise StateError(f"silo state file {self.path / ACCOUNTANT}: {exc}") from None
        try:
            released = [r for r in releases(self.ledger().chain) if r.owner == acc.owner and r.use is not None]
        except LedgerError as exc:
            raise StateError(f"silo state: {exc}") from None
        ledger_uses = [use for r in released if (use := r.use) is not None]
        if acc.uses == ledger_uses:
            return
        if len(acc.uses) > len(ledger_uses) and acc.uses[: len(ledger_uses)] == ledger_uses:
            extra = len(acc.uses) - len(ledger_uses)
            trained = [r.server_round for r in released if r.kind != DP_EVALUATION]
            log(
                WARNING,
                "silo %d: its accountant counted %d mechanism use(s) its ledger never recorded "
                "(stopped between the two writes; the output was never sent): dropped, the round is redone",
                self.partition_id,
                extra,
            )
            fixed = dataclasses.replace(acc, uses=list(ledger_uses), rounds=trained)
            state[records.STATE_PRIVACY] = ConfigRecord(fixed.to_json())
            return
        raise StateError(
            f"silo state: {self.path / ACCOUNTANT} counts {len(acc.uses)} mechanism use(s) but "
            f"{self.path / LEDGER} records {len(ledger_uses)} that the accountant does not extend"
        )

    def ledger(self) -> LedgerFile:
        """The silo's ledger on disk (verified)."""
        try:
            return LedgerFile(self.path / LEDGER, silo_owner(self.partition_id))
        except LedgerError as exc:
            raise StateError(f"silo state: {exc}") from None

    def saved_reply(self, server_round: int) -> RecordDict | None:
        """The reply this silo sent for ``server_round`` (None if it is not the saved one)."""
        meta_path = self.path / LAST_REPLY_META
        if not meta_path.exists():
            return None
        meta = self._json(LAST_REPLY_META)
        if int(meta.get("round", -1)) != server_round:
            return None
        content = RecordDict({records.ARRAYS: self._arrays(LAST_REPLY_ARRAYS)})
        content[records.METRICS] = MetricRecord(meta["metrics"])
        if meta.get("privacy") is not None:
            content[records.PRIVACY] = ConfigRecord(meta["privacy"])
        for key, saved in meta.get("evaluation", {}).items():  # eval.fused: the evaluation it carried
            content[key] = MetricRecord(saved["values"]) if saved["kind"] == "metric" else ConfigRecord(saved["values"])
        return content

    # ------------------------------------------------------------ writing
    def save_round(self, server_round: int, reply: RecordDict, state: RecordDict) -> None:
        """Persist a trained round: reply, user params, accountant, ledger lines, progress."""
        save_arrays(self.path / LAST_REPLY_ARRAYS, reply.array_records[records.ARRAYS])
        privacy = reply.config_records.get(records.PRIVACY)
        atomic_write_json(
            self.path / LAST_REPLY_META,
            {
                "round": server_round,
                "metrics": dict(reply.metric_records[records.METRICS]),
                "privacy": None if privacy is None else dict(privacy),
                "evaluation": {
                    key: {"kind": "metric" if isinstance(rec, MetricRecord) else "config", "values": dict(rec)}
                    for key, rec in reply.items()
                    if key.startswith(records.EVALUATION_PREFIX)
                },
            },
        )
        self.save_state(state)
        atomic_write_json(self.path / PROGRESS, {"last-round": server_round})

    def save_state(self, state: RecordDict) -> None:
        """Persist user params, accountant and new ledger lines from node state."""
        if records.STATE_USER_PARAMS in state:
            save_arrays(self.path / USER_PARAMS, state.array_records[records.STATE_USER_PARAMS])
        if records.STATE_PRIVACY in state.config_records:
            atomic_write_json(self.path / ACCOUNTANT, dict(state.config_records[records.STATE_PRIVACY]))
        if records.STATE_LEDGER in state.config_records:
            lines = [str(x) for x in state.config_records[records.STATE_LEDGER][records.LEDGER_LINES]]  # type: ignore[union-attr]
            ledger = self.ledger()
            if lines[: len(ledger)] != ledger.chain.lines:
                raise StateError(f"{ledger.path}: node state's ledger does not extend the one on disk")
            ledger.extend(lines[len(ledger) :])

    # ------------------------------------------------------------ helpers
    def _json(self, name: str) -> dict[str, Any]:
        path = self.path / name
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StateError(f"silo state file {path} is unreadable ({exc})") from None
        if not isinstance(data, dict):
            raise StateError(f"silo state file {path}: expected a JSON object")
        return data

    def _arrays(self, name: str) -> ArrayRecord:
        path = self.path / name
        try:
            return load_arrays(path)
        except (OSError, ValueError) as exc:
            raise StateError(f"silo state file {path} is unreadable ({exc})") from None
