"""The run directory's ledgers: one per silo (as the silos sent them) and the server's.

Silos chain their own events and send the lines the server does not hold yet with
their replies (the server tells each silo how many lines it holds, in the train
config). The server verifies that they continue the silo's chain before writing
them, records its own mechanism uses (central DP), and after every round appends a
``round-commit`` event with every silo ledger's length and head hash: this anchors
the silo chains, so truncating a silo ledger is detected too.
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

from flwr.supercore import log

from common.privacy.events import SERVER_OWNER, PrivacyRelease, silo_owner
from common.privacy.ledger import LedgerError, LedgerFile
from common.rundir import RunDir


class RunLedgers:
    """All ledgers of one run directory (re-opened and verified on resume)."""

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        self.server = LedgerFile(run_dir.server_ledger, SERVER_OWNER)
        self.silos: dict[int, LedgerFile] = {
            pid: LedgerFile(path, silo_owner(pid)) for pid, path in run_dir.silo_ledgers()
        }
        self.problems: list[str] = []

    def silo(self, partition_id: int) -> LedgerFile:
        """The ledger of silo ``partition_id`` (created empty on first use)."""
        if partition_id not in self.silos:
            self.silos[partition_id] = LedgerFile(self.run_dir.silo_ledger(partition_id), silo_owner(partition_id))
        return self.silos[partition_id]

    def counts(self) -> list[int]:
        """Lines held per partition id (index = partition id), for the train config."""
        if not self.silos:
            return []
        out = [0] * (max(self.silos) + 1)
        for pid, ledger in self.silos.items():
            out[pid] = len(ledger)
        return out

    def receive(self, partition_id: int, first_seq: int, lines: list[str]) -> bool:
        """Write a silo's new lines after verifying they continue its chain.

        Lines the server already holds (``first_seq`` below its count, e.g. resent
        after a lost reply) must be identical to the held ones. A problem is logged
        and recorded in :attr:`problems` (the audit will then report the gap); it
        never stops the run.
        """
        ledger = self.silo(partition_id)
        held = len(ledger)
        try:
            if first_seq > held:
                raise LedgerError(
                    ledger.path,
                    held + 1,
                    f"silo sent lines from seq {first_seq}; lines {held}..{first_seq - 1} are missing",
                )
            overlap = lines[: held - first_seq]
            if overlap != ledger.chain.lines[first_seq : first_seq + len(overlap)]:
                raise LedgerError(ledger.path, first_seq + 1, "silo resent lines that differ from the ones held")
            ledger.extend(lines[len(overlap) :])
        except LedgerError as exc:
            self.problems.append(str(exc))
            log(WARNING, "ledger of silo %d not extended: %s", partition_id, exc)
            return False
        return True

    def record_server(self, release: PrivacyRelease) -> None:
        """Append one of the server's own releases (central DP)."""
        self.server.append_release(release)

    def commit_round(self, server_round: int) -> str:
        """Anchor every silo ledger's length and head in the server ledger; returns the head."""
        self.server.append(
            "round-commit",
            server_round,
            silos={str(pid): {"lines": len(led), "head": led.head} for pid, led in sorted(self.silos.items())},
        )
        return self.server.head

    def anchor(self) -> dict[str, Any]:
        """The server ledger's length and head (written to ``state.json``)."""
        return {"server-lines": len(self.server), "server-head": self.server.head}
