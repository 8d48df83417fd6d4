"""Robustness to one hostile silo: each attack kind against each defence, on MovieLens-100K.

    python -m benchmarks.robustness --data-dir ../shared/data/ml-100k --markdown

5 IID silos (biased MF, ``simulations/configs/ml100k-mf.toml``), silo 0 attacks every
round (:mod:`simulations.attacks`), fedrec's in-process runtime. For every defence
(undefended FedAvg; fedrec's default defences = trimmed mean with weight caps, the
norm bound and opposed-update rejection; coordinate median; trimmed mean; multi-Krum —
the last three alone) and
every attack (plus the honest run) it reports the final round's test HR@10
(sampled protocol) and the *exposure* of the boosted item: the share of users whose
full-ranking top-10 (items they trained on excluded) holds it. Results go to
``docs/robustness.json`` and ``docs/robustness.png``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client import state
from common.config import AppConfig
from common.models import build_model, load_partial_state
from common.run_config import Scalar, load_default_run_config
from common.rundir import RunDir
from common.storage import load_arrays
from simulations.attacks import AttackSettings, run_attacked
from simulations.inprocess import InProcessGrid

CONFIG = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "ml100k-mf.toml"
DOCS = Path(__file__).resolve().parents[1] / "docs"
SILOS = 5
ATTACKS: dict[str, dict[str, Scalar]] = {
    "honest": {},
    "scale": {"attack.kind": "scale", "attack.strength": 20.0},
    "sign-flip": {"attack.kind": "sign-flip", "attack.strength": 5.0},
    "noise": {"attack.kind": "noise", "attack.strength": 0.5},
    "inflate-examples": {"attack.kind": "inflate-examples", "attack.strength": 1e4},
    "boost-item": {"attack.kind": "boost-item", "attack.strength": 25.0},
}
# Each robust aggregator alone (no norm bound, no weight cap, no opposed-update rejection),
# against plain FedAvg with nothing and fedrec's default defences (all of them together).
_ALONE: dict[str, Scalar] = {"strategy.norm-action": "none", "strategy.cap-weights": False, "strategy.reject-opposed": False}
DEFENCES: dict[str, dict[str, Scalar]] = {
    "fedavg (undefended)": {**_ALONE, "strategy.aggregator": "fedavg"},
    "default defences": {},
    "median": {**_ALONE, "strategy.aggregator": "median"},
    "trimmed mean": {**_ALONE, "strategy.aggregator": "trimmed-mean"},
    "krum": {**_ALONE, "strategy.aggregator": "krum"},
}


def base_config(data_dir: Path, rounds: int, run_dir: Path) -> dict[str, Scalar]:
    """The ML-100K MF settings, ``rounds`` rounds, evaluation in the last round only."""
    import tomllib

    from common.run_config import flatten

    cfg = load_default_run_config()
    cfg.update(flatten(tomllib.loads(CONFIG.read_text())))
    cfg.update(
        {
            "data.path": str(data_dir),
            "num-server-rounds": rounds,
            "eval.every": rounds,
            "eval.full-ranking": False,
            "strategy.min-nodes": SILOS,
            "run-dir": str(run_dir),
        }
    )
    return cfg


def target_item(data_dir: Path, rounds: int) -> int:
    """The least popular item with at least one training interaction (pooled over silos)."""
    from common.data.pipeline import load_interactions, split_interactions

    cfg = AppConfig.from_run_config(base_config(data_dir, rounds, Path("unused")))
    pooled = split_interactions(cfg.data, cfg.seed, load_interactions(cfg.data, cfg.seed))
    popularity = pooled.item_popularity
    trained = np.flatnonzero(popularity > 0)
    return int(trained[np.argmin(popularity[trained])])


def exposure(grid: InProcessGrid, cfg: AppConfig, run_dir: Path, item: int, k: int = 10) -> float:
    """Share of all silos' users whose top-``k`` (training items excluded) holds ``item``."""
    shared = load_arrays(RunDir(run_dir).final_model).to_torch_state_dict()
    hits = users = 0
    for context in grid.contexts.values():
        data = state.load_silo_data(context.state)
        assert data is not None
        split = data.split
        model = build_model(cfg.model.name, split.num_users, split.num_items, cfg.model.dim, cfg.model.mlp_layers)
        load_partial_state(model, dict(shared), private=False)
        state.restore_user_params(context.state, model)
        with torch.no_grad():
            scores = model.score_all(torch.arange(split.num_users)).numpy().copy()  # (U, I)
        scores[split.train_user, split.train_item] = -np.inf
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        hits += int((top == item).any(axis=1).sum())
        users += split.num_users
    return hits / users


def run_cell(
    data_dir: Path, rounds: int, item: int, defence: dict[str, Scalar], attack: dict[str, Scalar]
) -> dict[str, Any]:
    """One run: final test HR@10, the boosted item's exposure, the silos the report flagged."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cfg = {**base_config(data_dir, rounds, run_dir), **defence}
        settings = AttackSettings.from_overrides({"attack.silo": 0, **attack, "attack.item": item}) if attack else None
        start = time.process_time()
        grid, _ = run_attacked(cfg, SILOS, settings)
        rounds_done = RunDir(run_dir).read_rounds()
        final = rounds_done[-1]
        parsed = AppConfig.from_run_config(cfg)
        flagged = sorted({s.node for r in rounds_done for s in r.silos if s.outlier or s.rejected})
        return {
            "test-hr@10": final.evaluate["test-hr@10"],
            "exposure": exposure(grid, parsed, run_dir, item),
            "item": item,
            "flagged-nodes": flagged,
            "attacker-node": 1,
            "cpu-seconds": time.process_time() - start,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument("--out", type=Path, default=DOCS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    torch.set_num_threads(1)
    item = target_item(args.data_dir, args.rounds)
    results: dict[str, dict[str, Any]] = {}
    for defence, d_cfg in DEFENCES.items():
        for attack, a_cfg in ATTACKS.items():
            cell = run_cell(args.data_dir, args.rounds, item, d_cfg, a_cfg)
            results[f"{defence} | {attack}"] = cell
            print(f"{defence:20s} {attack:17s} HR@10 {cell['test-hr@10']:.4f} exposure {cell['exposure']:.3f} "
                  f"({cell['cpu-seconds']:.0f} s CPU)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robustness.json").write_text(json.dumps({"rounds": args.rounds, "results": results}, indent=1) + "\n")
    plot(results, args.out / "robustness.png")
    print_tables(results, markdown=args.markdown)


def print_tables(results: dict[str, dict[str, Any]], *, markdown: bool) -> None:
    """Test HR@10 and exposure: one row per defence, one column per attack."""
    for metric, fmt in (("test-hr@10", "{:.4f}"), ("exposure", "{:.1%}")):
        header = ["defence", *ATTACKS]
        rows = [[d, *(fmt.format(results[f"{d} | {a}"][metric]) for a in ATTACKS)] for d in DEFENCES]
        if markdown:
            print(f"\n{metric}\n")
            print("| " + " | ".join(header) + " |")
            print("|" + "---|" * len(header))
            for row in rows:
                print("| " + " | ".join(row) + " |")
        else:
            print(f"\n{metric}: " + " ".join(f"{h:>17s}" for h in header))
            for row in rows:
                print(" ".join(f"{c:>17s}" for c in row))


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Grouped bars: HR@10 and exposure per attack, one bar per defence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    x = np.arange(len(ATTACKS))
    width = 0.8 / len(DEFENCES)
    for ax, metric in zip(axes, ("test-hr@10", "exposure"), strict=True):
        for i, d in enumerate(DEFENCES):
            ax.bar(x + i * width, [results[f"{d} | {a}"][metric] for a in ATTACKS], width, label=d)
        ax.set_xticks(x + width * (len(DEFENCES) - 1) / 2, list(ATTACKS), rotation=20)
        ax.set_title({"test-hr@10": "test HR@10 (final round)", "exposure": "boosted item in top-10 (share of users)"}[metric])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
