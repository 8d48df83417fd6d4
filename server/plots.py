"""The run report's plots: ranking quality and loss per round, ε per round."""

from __future__ import annotations

from pathlib import Path

from common import records
from common.round_record import RoundRecord
from server.report import silo_epsilons


def plot_rounds(rounds: list[RoundRecord], path: Path, k: int) -> None:
    """HR@K, NDCG@K (validation and test) and training loss per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    evaluated = [r for r in rounds if r.evaluate]
    xs = [r.server_round for r in evaluated]
    for key, style in ((f"test-hr@{k}", "-o"), (f"test-ndcg@{k}", "-s"), (f"val-hr@{k}", "--")):
        left.plot(xs, [r.evaluate.get(key) for r in evaluated], style, label=key)
    left.set_xlabel("round")
    left.set_title("ranking quality (sampled protocol)")
    left.legend()
    right.plot([r.server_round for r in rounds], [r.train.get(records.TRAIN_LOSS) for r in rounds], "-o")
    right.set_xlabel("round")
    right.set_title("training loss (example-weighted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_privacy(rounds: list[RoundRecord], path: Path) -> None:
    """ε per round: one line per silo (local DP) and one for the server (central DP)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    units = {e.partition_id: e.unit for r in rounds for e in r.privacy}
    for silo, points in silo_epsilons(rounds).items():
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", ms=3, label=f"silo {silo} (unit: {units[silo]})")
        declined = [p for p in points if not p[2]]
        if declined:
            ax.plot([p[0] for p in declined], [p[1] for p in declined], "x", color="red")
    central = [(r.server_round, r.central.epsilon) for r in rounds if r.central is not None]
    if central:
        ax.plot(*zip(*central, strict=True), "-s", color="black", label="server, central DP (unit: silo)")
    ax.set_xlabel("round")
    ax.set_ylabel("ε (PLD, at each line's δ)")
    ax.set_title("privacy spent per round (x = budget reached, round declined)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


