"""The run report's plots: ranking quality and loss per round, ε per round."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import records
from common.privacy.statement import format_delta
from common.round_record import RoundRecord
from server.report import POPULARITY, silo_epsilons

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

UNIT_LABEL = {"user": "user-level", "interaction": "interaction-level", "client": "client-level (one silo)"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_rounds(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def rounds_figure(rounds: list[RoundRecord], k: int) -> Figure:
    """HR@K, NDCG@K (validation and test, and popularity's when evaluated) and training loss per round."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    evaluated = [r for r in rounds if r.evaluate]
    xs = [r.server_round for r in evaluated]
    for key, style in ((f"test-hr@{k}", "-o"), (f"test-ndcg@{k}", "-s"), (f"val-hr@{k}", "--")):
        left.plot(xs, [r.evaluate.get(key) for r in evaluated], style, label=key)
    popularity = f"{POPULARITY}test-hr@{k}"
    if any(popularity in r.evaluate for r in evaluated):
        left.plot(xs, [r.evaluate.get(popularity) for r in evaluated], ":", color="grey", label=popularity)
    if not evaluated:
        left.text(0.5, 0.5, "evaluation withheld (not sent under DP)", ha="center", va="center",
                  transform=left.transAxes)
    _integer_rounds(left)
    left.set_title("ranking quality (sampled protocol)")
    if evaluated:
        left.legend()
    losses = [(r.server_round, r.train[records.TRAIN_LOSS]) for r in rounds if records.TRAIN_LOSS in r.train]
    if losses:
        right.plot([x for x, _ in losses], [y for _, y in losses], "-o")
        right.set_title("training loss (example-weighted)")
    else:
        right.set_title("training loss: withheld (stays in each silo under DP)")
    _integer_rounds(right)
    fig.tight_layout()
    return fig


def plot_rounds(rounds: list[RoundRecord], path: Path, k: int) -> None:
    """Write :func:`rounds_figure` to ``path``."""
    fig = rounds_figure(rounds, k)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def privacy_figure(rounds: list[RoundRecord]) -> Figure:
    """ε per round: one line per silo (local DP), one for the server (central DP), and the budgets."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    by_silo = {e.partition_id or 0: e for r in rounds for e in r.privacy}
    budgets: dict[float, str] = {}
    for silo, points in silo_epsilons(rounds).items():
        e = by_silo[silo]
        label = f"silo {silo}: {UNIT_LABEL.get(e.unit, e.unit)}, δ = {format_delta(e.delta)}"
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", ms=3, label=label)
        declined = [p for p in points if not p[2]]
        if declined:
            ax.plot([p[0] for p in declined], [p[1] for p in declined], "x", color="red")
        if e.target_epsilon > 0:
            budgets.setdefault(e.target_epsilon, "silo budget")
    central = [r.central for r in rounds if r.central is not None]
    if central:
        c = central[-1]
        ax.plot(
            [x.server_round for x in central], [x.epsilon for x in central], "-s", color="black",
            label=f"server: {UNIT_LABEL.get(c.unit, c.unit)}, δ = {format_delta(c.delta)}",
        )
        if c.target_epsilon > 0:
            budgets[c.target_epsilon] = "server budget" if c.target_epsilon not in budgets else "silo and server budget"
    for value, what in sorted(budgets.items()):
        ax.axhline(value, color="grey", lw=0.9, ls="--", label=f"{what} ε = {value:g}")
    accountants = sorted({e.accountant.upper() for e in [*by_silo.values(), *central]})
    _integer_rounds(ax)
    ax.set_ylabel(f"ε ({', '.join(accountants) or 'PLD'}, at each line's δ)")
    ax.set_title("privacy spent per round (x = budget reached, round declined)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_privacy(rounds: list[RoundRecord], path: Path) -> None:
    """Write :func:`privacy_figure` to ``path``."""
    fig = privacy_figure(rounds)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
