"""Global vs personalized MF on MovieLens-100K, 5 silos, IID and Dirichlet-skewed silos.

    python -m benchmarks.personalization --data-dir ../shared/data/ml-100k

Each setting is one federated run on fedrec's in-process runtime
(:func:`simulations.inprocess.run_inprocess`) with ``personalize.enabled``: at every
evaluated round each silo reports the global model's sums and those of its own
fine-tuned copy (fine-tune epochs selected per silo on its validation items,
negatives outside each user's training set). Global: test HR@10 at the round with
the best pooled validation HR@10. Personalized: each silo's kept copy (chosen on
its own validation users) at that same round; the round with the best pooled
*personalized* validation HR@10 is printed beside it. Test never selects anything. The
tuned centralized MF (``simulations.centralized``, epochs selected on validation)
is the reference row, with the same recency shift (``personalize.method = "recency"``,
one (m, β) chosen on all users' validation items) beside it: what a silo's recency
head adds is not specific to federation.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cli.config import resolve_config
from common.config import AppConfig
from common.data.pipeline import load_interactions, partition, split_interactions
from common.evaluation import EvalProtocol, evaluation_sums, summarize
from common.personalization import recency_select
from common.run_config import load_default_run_config, parse_override
from simulations.centralized import best_epoch, run_centralized
from simulations.inprocess import run_inprocess

#: Federated MF settings (chosen on validation HR@10, see docs/personalization.md).
FEDERATED = {
    "data.dataset": "ml-100k",
    "model.name": "mf",
    "model.dim": 32,
    "train.lr": 0.005,
    "train.l2": 0.01,
    "train.num-negatives": 4,
    "train.batch-size": 256,
    "train.local-epochs": 1,
    # Honest silos: plain FedAvg, no norm bound, no rejection of "opposed" updates (under
    # Dirichlet skew the default defences reject honest silos whose tastes differ).
    "strategy.aggregator": "fedavg",
    "strategy.norm-action": "none",
    "strategy.reject-opposed": False,
    "personalize.enabled": True,
    "personalize.params": "all",
    "personalize.epochs": 5,
    "personalize.lr": 0.001,
}
#: The centralized MF of simulations/configs/ml100k-mf.toml (tuned on validation, benchmarks.tune).
CENTRALIZED = ["data.dataset=ml-100k", "model.dim=32", "train.lr=0.002", "train.l2=0.01", "train.num-negatives=4"]
SETTINGS = {"iid": {"data.skew": "iid"}} | {
    f"dirichlet-{a}": {"data.skew": "dirichlet", "data.dirichlet-alpha": a} for a in (0.1, 0.5)
}


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence (nats) of two distributions over the same support."""
    mid = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / mid[nz])))

    return 0.5 * kl(p) + 0.5 * kl(q)


def skew(data_dir: Path, setting: dict, silos: int) -> dict:
    """How far the silos of ``setting`` are from the pool: sizes, mean JS divergences, dominant-genre share.

    Per silo, of its users' *training* interactions: the item-popularity distribution
    and the category (ML-100K: first genre) mix, each against the pooled one; and the
    share of its users whose dominant category is the silo's most common one.
    """
    run_config = load_default_run_config()
    run_config.update(FEDERATED | setting | {"data.path": str(data_dir)})
    cfg = AppConfig.from_run_config(run_config)
    interactions = load_interactions(cfg.data, cfg.seed)
    pooled = split_interactions(cfg.data, cfg.seed, interactions)
    parts = partition(cfg.data, cfg.seed, pooled, interactions, silos)
    split, category = pooled.split, interactions.item_category
    assert category is not None
    category = np.where(category < 0, category.max() + 1, category)
    n_cat = int(category.max()) + 1
    items, cats = split.train_item, category[split.train_item]
    pool_items = np.bincount(items, minlength=split.num_items) / len(items)
    pool_cats = np.bincount(cats, minlength=n_cat) / len(cats)
    counts = np.zeros((split.num_users, n_cat))
    np.add.at(counts, (split.train_user, cats), 1.0)
    dominant = counts.argmax(axis=1)
    js_items, js_cats, shares = [], [], []
    for users in parts:
        mine = np.isin(split.train_user, users)
        js_items.append(js_divergence(np.bincount(items[mine], minlength=split.num_items) / mine.sum(), pool_items))
        js_cats.append(js_divergence(np.bincount(cats[mine], minlength=n_cat) / mine.sum(), pool_cats))
        shares.append(np.bincount(dominant[users], minlength=n_cat).max() / len(users))
    return {
        "sizes": [len(p) for p in parts],
        "js-items": float(np.mean(js_items)),
        "js-categories": float(np.mean(js_cats)),
        "dominant-share": float(np.mean(shares)),
    }


def best_round(rounds: list[dict], prefix: str) -> dict:
    """The evaluated round with the best ``{prefix}val-hr@10`` (earliest on ties)."""
    evaluated = [r for r in rounds if r["evaluate"]]
    return max(evaluated, key=lambda r: (r["evaluate"][f"{prefix}val-hr@10"], -r["round"]))


def federated(data_dir: Path, setting: dict, rounds: int, every: int, silos: int, extra: dict) -> dict:
    """One federated run; global and personalized metrics at their best-validation rounds."""
    run_dir = Path(tempfile.mkdtemp(prefix="fedrec-personalization-")) / "run"
    cfg = load_default_run_config()
    cfg.update(FEDERATED | setting | extra)
    cfg.update({"data.path": str(data_dir), "num-server-rounds": rounds, "eval.every": every, "run-dir": str(run_dir)})
    start = time.perf_counter()
    run_inprocess(cfg, silos)
    seconds = time.perf_counter() - start
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    g, p = best_round(history, ""), best_round(history, "personalized-")
    return {
        "seconds": seconds,
        "personalized-at-global-round": g["evaluate"]["personalized-test-hr@10"],
        "personalized-val-at-global-round": g["evaluate"]["personalized-val-hr@10"],
        "paired": (
            g["round"],
            g["evaluate"]["personalized-val-hr@10"],
            g["evaluate"]["personalized-test-hr@10"],
            g["evaluate"]["personalized-test-ndcg@10"],
        ),
        "global": (g["round"], g["evaluate"]["val-hr@10"], g["evaluate"]["test-hr@10"], g["evaluate"]["test-ndcg@10"]),
        "personalized": (
            p["round"],
            p["evaluate"]["personalized-val-hr@10"],
            p["evaluate"]["personalized-test-hr@10"],
            p["evaluate"]["personalized-test-ndcg@10"],
        ),
    }


def table(rows: list[tuple[str, str, dict]]) -> list[str]:
    """The markdown table of (setting, label, :func:`federated` result) rows.

    Personalized: at the global model's best-validation round (each silo's choice is
    already made on its own validation users; no second selection over rounds). Last
    column: at the round with the best pooled personalized validation (a second,
    optimistic selection), for comparison.
    """
    lines = [
        "| silos | setting (selected on val) | model | best-val round | val HR@10 | test HR@10 | test NDCG@10 "
        "| Δ test HR@10 | personalized at its own best-val round: round, test HR@10 (Δ) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label, result in rows:
        g, p, at = result["global"], result["personalized"], result["paired"]
        lines.append(f"| {name} | {label} | global | {g[0]} | {g[1]:.4f} | {g[2]:.4f} | {g[3]:.4f} | | |")
        lines.append(
            f"| {name} | {label} | personalized | {g[0]} | {at[1]:.4f} | {at[2]:.4f} | {at[3]:.4f} | {at[2] - g[2]:+.4f} "
            f"| {p[0]}, {p[2]:.4f} ({p[2] - g[2]:+.4f}) |"
        )
    return lines


def centralized_recency(cfg: AppConfig, epochs: int) -> dict:
    """The centralized MF trained ``epochs`` epochs, with the recency shift chosen on all users' validation items."""
    box: dict = {}
    run_centralized(cfg, epochs, evaluate_every=epochs, on_trained=lambda model, data: box.update(model=model, data=data))
    cpu = torch.device("cpu")
    settings = dataclasses.replace(cfg.personalize, method="recency", margin=0.0)
    kept = recency_select(box["model"], box["data"].split, settings, k=cfg.eval.k, device=cpu)
    protocol = EvalProtocol(cfg.eval.k, cfg.eval.full_ranking, cfg.eval.full_ranking_k)
    sums = evaluation_sums(kept.model, box["data"].split, protocol, box["data"].item_popularity, cpu)
    return summarize(sums, cfg.eval.k) | {"items": kept.items, "weight": kept.weight}


def main() -> None:
    """Run every setting and the centralized reference; print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--every", type=int, default=4, help="evaluate (and personalize) every N rounds")
    parser.add_argument("--silos", type=int, default=5)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"subset of {','.join(SETTINGS)}")
    parser.add_argument("--centralized-epochs", type=int, default=30, help="0 = skip the centralized row")
    parser.add_argument("--skew-only", action="store_true", help="print the silos' skew table and stop")
    parser.add_argument("-c", "--config", action="append", default=[], help="override key=value of the federated runs")
    parser.add_argument(
        "-g", "--grid", action="append", default=[], help="key=v1,v2,... searched per setting on validation HR@10"
    )
    parser.add_argument(
        "--select",
        choices=("global", "personalized"),
        default="global",
        help="the grid's point: best global validation HR@10, or best personalized validation HR@10 at the global's round",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_dir = args.data_dir.resolve()
    extra = dict(parse_override(text) for text in args.config)
    axes = [(key, values.split(",")) for key, _, values in (g.partition("=") for g in args.grid)]
    print("| silos | silo sizes (users) | JS of item popularity | JS of category mix | users of the silo's top dominant category |")
    print("|---|---|---|---|---|")
    for name in args.settings.split(","):
        sk = skew(data_dir, SETTINGS[name], args.silos)
        sizes = ", ".join(map(str, sk["sizes"]))
        print(f"| {name} | {sizes} | {sk['js-items']:.4f} | {sk['js-categories']:.4f} | {sk['dominant-share']:.2f} |")
    print(flush=True)
    if args.skew_only:
        return
    rows = []
    for name in args.settings.split(","):
        tried = []
        for combo in itertools.product(*(values for _, values in axes)):
            grid = dict(parse_override(f"{key}={value}") for (key, _), value in zip(axes, combo, strict=True))
            result = federated(data_dir, SETTINGS[name], args.rounds, args.every, args.silos, extra | grid)
            g, p = result["global"], result["personalized"]
            label = " ".join(f"{k}={v}" for k, v in grid.items()) or "(fixed)"
            print(
                f"{name} {label}: global round {g[0]} val {g[1]:.4f} test {g[2]:.4f} | personalized round {p[0]} "
                f"val {p[1]:.4f} test {p[2]:.4f} (at round {g[0]}: {result['personalized-at-global-round']:.4f}) "
                f"| {result['seconds']:.0f} s",
                flush=True,
            )
            score = g[1] if args.select == "global" else result["personalized-val-at-global-round"]
            tried.append((score, label, result))
        _, label, result = max(tried, key=lambda t: t[0])  # selected on validation HR@10 (--select)
        rows.append((name, label, result))
    print()
    print("\n".join(table(rows)))
    if args.centralized_epochs:
        _, cfg = resolve_config([*CENTRALIZED, f"data.path={data_dir}"])
        best = best_epoch(run_centralized(cfg, args.centralized_epochs), cfg.eval.k)
        m = best.metrics
        print(
            f"| all users | tuned (benchmarks.tune) | centralized MF | epoch {best.epoch} | {m['val-hr@10']:.4f} | {m['test-hr@10']:.4f} "
            f"| {m['test-ndcg@10']:.4f} | | |"
        )
        r = centralized_recency(cfg, best.epoch)
        print(
            f"| all users | tuned, + recency (m = {r['items']}, β = {r['weight']}) | centralized MF | epoch {best.epoch} "
            f"| {r['val-hr@10']:.4f} | {r['test-hr@10']:.4f} | {r['test-ndcg@10']:.4f} | {r['test-hr@10'] - m['test-hr@10']:+.4f} | |"
        )


if __name__ == "__main__":
    main()
