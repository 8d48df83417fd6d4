"""The privacy ledger: an append-only, hash-chained JSONL log of every DP mechanism use.

Every silo keeps one ledger, the server keeps one; each line is one JSON event.
A line's ``prev`` field is the SHA-256 of the previous line's bytes (the first line
has :data:`GENESIS`), and ``seq`` is its 0-based position, so editing, deleting or
reordering any line breaks the chain at a line that :func:`read_ledger` names.
Deleting lines *at the end* keeps a valid shorter chain: that is caught against the
heads the server commits every round (``round-commit`` events) and the server's
head in ``state.json``.

Lines are canonical JSON (sorted keys, no spaces), so hashing needs nothing but
the file's bytes. The format is documented in ``docs/ledger-format.md``; an auditor
can replay it with dp-accounting alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.errors import FedrecError
from common.privacy.events import RELEASE_KINDS, PrivacyRelease, ReleaseError
from common.versions import library_versions

FORMAT = "fedrec-ledger/1"
GENESIS = "0" * 64

class LedgerError(FedrecError):
    """A ledger is malformed, its chain is broken, or an append does not continue it."""

    def __init__(self, path: Path | str, line: int | None, reason: str) -> None:
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {reason}")
        self.path = str(path)
        self.line = line
        self.reason = reason


def line_hash(line: str) -> str:
    """SHA-256 (hex) of one ledger line, without its newline."""
    return hashlib.sha256(line.encode()).hexdigest()


def encode(event: Mapping[str, Any]) -> str:
    """Canonical JSON of an event (one line, no newline)."""
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def now() -> str:
    """UTC timestamp of an event."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class Entry:
    """One verified line: its event, its text and its hash."""

    seq: int
    event: dict[str, Any]
    text: str
    hash: str


class Chain:
    """A ledger in memory: verified lines plus the head to chain the next one to.

    Parameters
    ----------
    owner : str
        ``"server"`` or ``"silo-<partition id>"``; written into every event.
    lines : iterable of str
        Existing lines (verified on construction).
    source : str
        Where the lines came from, for error messages.
    """

    def __init__(self, owner: str, lines: Iterable[str] = (), source: str = "<memory>") -> None:
        self.owner = owner
        self.source = source
        self.entries: list[Entry] = []
        for line in lines:
            self._accept(line)

    @property
    def head(self) -> str:
        """Hash of the last line (:data:`GENESIS` when empty)."""
        return self.entries[-1].hash if self.entries else GENESIS

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def lines(self) -> list[str]:
        """The lines' text, in order."""
        return [e.text for e in self.entries]

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Events in order (optionally of one ``kind``)."""
        return [e.event for e in self.entries if kind is None or e.event.get("kind") == kind]

    def append(self, kind: str, server_round: int, **fields: Any) -> str:
        """Chain a new event; returns its line."""
        event = {
            "format": FORMAT,
            "seq": len(self.entries),
            "prev": self.head,
            "time": now(),
            "owner": self.owner,
            "round": server_round,
            "kind": kind,
            "versions": library_versions(),
            **fields,
        }
        line = encode(event)
        self._accept(line)
        return line

    def append_release(self, release: PrivacyRelease) -> str:
        """Chain a privacy release (its :meth:`~PrivacyRelease.to_json` fields); returns its line."""
        return self.append(release.kind, release.server_round, **_release_fields(release))

    def extend(self, lines: Iterable[str]) -> None:
        """Accept lines written elsewhere (e.g. a silo's), verifying they continue the chain.

        All or nothing: if any line fails, the chain is left as it was.
        """
        start = len(self.entries)
        try:
            for line in lines:
                self._accept(line)
        except LedgerError:
            del self.entries[start:]
            raise

    def _accept(self, line: str) -> None:
        number = len(self.entries) + 1
        event = parse_line(line, self.source, number)
        expected_seq = len(self.entries)
        if event.get("seq") != expected_seq:
            raise LedgerError(
                self.source, number,
                f"seq is {event.get('seq')!r}, expected {expected_seq}: a line was deleted, "
                "inserted or reordered before it",
            )
        if event.get("prev") != self.head:
            raise LedgerError(
                self.source, number,
                f"prev does not match the hash of line {number - 1}: line {number - 1} was "
                "edited, or lines around it were deleted or reordered"
                if number > 1
                else "prev of the first line is not the genesis hash: lines before it were deleted",
            )
        if event.get("owner") != self.owner:
            raise LedgerError(
                self.source, number, f"owner is {event.get('owner')!r}, expected {self.owner!r}"
            )
        self.entries.append(Entry(expected_seq, event, line, line_hash(line)))


def parse_line(line: str, source: str, number: int) -> dict[str, Any]:
    """Decode one line; a malformed line is a :class:`LedgerError` naming it."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LedgerError(source, number, f"not valid JSON ({exc.msg})") from None
    if not isinstance(event, dict):
        raise LedgerError(source, number, "not a JSON object")
    if event.get("format") != FORMAT:
        raise LedgerError(source, number, f"format is {event.get('format')!r}, expected {FORMAT!r}")
    for key in ("seq", "prev", "owner", "round", "kind"):
        if key not in event:
            raise LedgerError(source, number, f"missing field {key!r}")
    if encode(event) != line:
        raise LedgerError(source, number, "not in canonical form (sorted keys, no spaces)")
    return event


def read_ledger(path: Path, owner: str) -> Chain:
    """Read and verify a ledger file.

    Raises
    ------
    LedgerError
        Naming the file and line of the first problem (malformed line, broken chain,
        truncated last line).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LedgerError(path, None, f"cannot read ({exc.strerror})") from None
    if data and not data.endswith(b"\n"):
        count = data.count(b"\n") + 1
        raise LedgerError(path, count, "last line is incomplete (no newline): an interrupted write")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise LedgerError(path, None, "not UTF-8 text") from None
    return Chain(owner, text.splitlines(), source=str(path))


class LedgerFile:
    """A ledger on disk: verified on open, appended to with synced writes, never rewritten.

    Each append is one ``write`` of whole lines to a file opened with ``O_APPEND``,
    followed by ``fsync``; a crash can at worst leave an incomplete last line, which
    :func:`read_ledger` reports instead of silently dropping.
    """

    def __init__(self, path: Path, owner: str) -> None:
        self.path = path
        self.chain = read_ledger(path, owner) if path.exists() else Chain(owner, source=str(path))

    def __len__(self) -> int:
        return len(self.chain)

    @property
    def head(self) -> str:
        """Hash of the last line on disk."""
        return self.chain.head

    def append(self, kind: str, server_round: int, **fields: Any) -> str:
        """Chain and write one event; returns its line."""
        line = self.chain.append(kind, server_round, **fields)
        self._write([line])
        return line

    def append_release(self, release: PrivacyRelease) -> str:
        """Chain and write a privacy release; returns its line."""
        line = self.chain.append_release(release)
        self._write([line])
        return line

    def extend(self, lines: list[str]) -> None:
        """Verify that ``lines`` continue the chain, then write them."""
        self.chain.extend(lines)  # raises before anything is written
        self._write(lines)

    def _write(self, lines: list[str]) -> None:
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(f"{line}\n" for line in lines).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def _release_fields(release: PrivacyRelease) -> dict[str, Any]:
    """A release's fields without those the ledger envelope carries itself."""
    fields = release.to_json()
    for key in ("owner", "round", "kind"):
        del fields[key]
    return fields


def releases(chain: Chain) -> list[PrivacyRelease]:
    """The privacy releases of a verified chain, in order (other events skipped).

    Raises
    ------
    LedgerError
        Naming the line of an event that is not a valid release.
    """
    out = []
    for entry in chain.entries:
        if entry.event["kind"] in RELEASE_KINDS:
            try:
                out.append(PrivacyRelease.from_json(entry.event))
            except ReleaseError as exc:
                raise LedgerError(chain.source, entry.seq + 1, f"not a valid privacy release: {exc}") from None
    return out
