"""``fedrec audit RUN_DIR``: verify and recompute a run's privacy claims."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.output import err, os_errors


def audit(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by fedrec simulate/deploy.")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write audit.json/audit.md/plots (default: RUN_DIR).")
    ] = None,
    empirical: Annotated[bool, typer.Option(help="Score the run's canaries (if it trained any).")] = True,
) -> None:
    """Verify every ledger chain, replay every ε (PLD, RDP, PRV), check budgets and canaries.

    Exit codes: 0 passed; 1 not an auditable run directory; 2 the results cannot be
    written (read-only or full disk); 3 broken or unanchored ledger chain; 4 claimed ε
    differs from the replayed ε (or a DP round is missing from the ledger); 5 budget
    overrun; 6 the empirical lower bound exceeds the claimed ε. With several problems,
    the smallest code wins.
    """
    from common.privacy.audit import EXIT_CODES, AuditInputError, audit_run
    from common.privacy.audit_report import write_audit
    from common.privacy.replay import dropout_text

    # Wide enough for the ε table when output is not a terminal (logs, CI).
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 150)
    try:
        result = audit_run(run_dir, empirical=empirical)
    except AuditInputError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    with os_errors(out or run_dir):
        paths = write_audit(result, out or run_dir)
    table = Table(title="privacy audit (ε replayed from the ledgers)")
    for col in ("ledger", "unit", "δ", "rounds", "steps", "ε PLD", "ε RDP", "ε PRV", "no ampl.", "budget"):
        table.add_column(col, justify="left" if col in ("ledger", "unit") else "right")
    for led in result.ledgers:
        if not led.trajectory:
            continue
        table.add_row(
            led.owner, str(led.unit), f"{led.delta:.2e}", str(len(led.trajectory)), str(led.total_steps),
            f"{led.final_pld:.3f}", f"{led.final_rdp:.3f}",
            "n/a" if led.final_prv is None else f"{led.final_prv:.3f}",
            f"{led.no_amplification:.3g}", f"{led.target_epsilon:g}" if led.target_epsilon else "-",
        )
    console.print(table)
    for led in result.ledgers:
        for d in led.dropouts:  # distributed DP: a secure sum that missed silos (what its noise still gives)
            console.print(f"{led.owner}: {dropout_text(d)}")
    emp = result.empirical or {}
    if "one-run" in emp:
        one = emp["one-run"]
        console.print(
            f"empirical (one-run, silo {one['silo']}, {one['canaries']} canaries): "
            f"ε_LB = {one['epsilon_lb']:.3f} at 95% vs claimed ε = {one['claimed-epsilon']:.3f}"
        )
    if "one-shot" in emp:
        shot = emp["one-shot"]
        console.print(
            f"empirical (one-shot, canary clients): ε̂ = {shot['epsilon']:.3f} "
            f"vs claimed ε = {shot['claimed-epsilon']:.3f}"
        )
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    for p in result.problems:
        err.print(f"[bold red]{p}[/]")
    console.print("written: " + ", ".join(str(p) for p in paths))
    if result.problems:
        err.print(f"[bold red]audit FAILED[/] (exit code {result.exit_code}; codes: {EXIT_CODES})")
        raise typer.Exit(result.exit_code)
    console.print("[bold green]audit passed[/]")
