"""What the ``fedrec`` commands print: errors, Flower's progress lines, result tables."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from common.round_record import RoundRecord

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

_PROGRESS = re.compile(r"fedrec |│|ERROR|Error|Exception|Traceback|Successfully started run")


def fail(error: Exception | str, code: int = 2) -> NoReturn:
    """Print ``error`` without a traceback and exit with ``code`` (2: bad input)."""
    err.print(f"[bold red]error:[/] {escape(str(error))}")
    raise typer.Exit(code)


def write_error(exc: OSError, path: Path) -> str:
    """``<file>: cannot write (<reason>)``: the file the system named, else ``path``."""
    where = exc.filename if exc.filename is not None else path
    return f"{where}: cannot write ({exc.strerror or exc})"


@contextlib.contextmanager
def os_errors(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` inside (read-only or full disk...) into :func:`fail` (exit 2).

    The message names the file (``path`` when the system named none) and the reason.
    A closed pipe or connection is not a file problem and is re-raised.
    """
    try:
        yield
    except ConnectionError:
        raise
    except OSError as exc:
        fail(write_error(exc, path))


def is_progress(line: str) -> bool:
    """Whether a line of Flower's log stream is shown without ``--verbose``."""
    return _PROGRESS.search(line) is not None


def fmt(value: object) -> str:
    """A metric with 4 decimals; ``-`` when missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"


def print_rounds(rounds: Sequence[RoundRecord], k: int) -> None:
    """The per-round table: training loss, federated evaluation, seconds."""
    table = Table(title="fedrec: per-round results (federated evaluation)")
    keys = [f"val-hr@{k}", f"test-hr@{k}", f"test-ndcg@{k}", "test-full-recall@20"]
    for col in ["round", "train loss", *keys, "seconds"]:
        table.add_column(col, justify="right")
    for r in rounds:
        table.add_row(
            str(r.server_round),
            fmt(r.train.get("train-loss")),
            *(fmt(r.evaluate.get(key)) for key in keys),
            f"{r.seconds:.1f}",
        )
    console.print(table)


def print_privacy(rounds: Sequence[RoundRecord]) -> None:
    """ε after each round, per silo (local DP) and for the server (central DP)."""
    silos = sorted({e.partition_id for r in rounds for e in r.privacy if e.partition_id is not None})
    central = any(r.central is not None for r in rounds)
    if not silos and not central:
        return
    first = next((e for r in rounds for e in r.privacy), None)
    title = "fedrec: ε after each round (* = silo declined: budget)"
    if first is not None:
        title += f" — local: unit {first.unit}, δ={first.delta:.1e}, {first.accountant.upper()}"
    table = Table(title=title)
    table.add_column("round", justify="right")
    for s in silos:
        table.add_column(f"silo {s}", justify="right")
    if central:
        table.add_column("central (unit: silo)", justify="right")
    for r in rounds:
        by_silo = {e.partition_id: e for e in r.privacy}
        cells = [
            "-" if s not in by_silo else f"{by_silo[s].epsilon:.3f}{'' if by_silo[s].trained else '*'}"
            for s in silos
        ]
        if central:
            cells.append("-" if r.central is None else f"{r.central.epsilon:.3f}")
        table.add_row(str(r.server_round), *cells)
    console.print(table)
