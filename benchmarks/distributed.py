"""Distributed user-level DP vs DP popularity vs non-private: test HR@10 at ε ∈ {1, 2, 4, 8}.

    python -m benchmarks.distributed --data-dir ../shared/data/ml-100k --repeats 3 \
        --reference <benchmarks.privacy_utility's results.json>
    python -m benchmarks.distributed --preset synthetic-100k

Each distributed point is one federated run (``--repeats N``: the mean of N) through fedrec's real ServerApp and ClientApps
(in-process grid, protobuf round trip of every message, SecAgg+ secure sums) with
``privacy.mode = distributed``: unit one user of any silo, population the union of the
silos' users, δ = min(1e-5, 1/(10·N_total)), σ calibrated (PLD, zero-out) so that the
popularity histogram (the preset's share of ε) and every planned round end exactly at ε.

Evaluation: under DP the silos withhold their evaluation sums from the server (the release
policy). This benchmark's experimenter is every silo, so it pools the sums each silo kept in
its own ``silo-report.jsonl`` (``<state-root>/silo-K/<uid>/``); those numbers never reach
the server. Test HR@10 is reported at the evaluated round with the best pooled validation
HR@10; the hyperparameters come from the preset (chosen on validation).

DP popularity: item counts under the same l2 rule (each user adds 1/√k to each of their k
items: sensitivity 1) plus Gaussian noise of σ_h·√(S/(S−T)) (what the secure sum of S
honest shares carries), σ_h calibrated so that this one histogram spends the whole ε; items
ranked by the noisy count (``--repeats N``: N noise draws). Non-private: ``privacy.mode = none``
with the same preset's federated model (``--nonprivate``); ``--reference`` adds the
non-private and local-DP rows of a ``benchmarks.privacy_utility`` run (its own preset).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import AppConfig
from common.data.pipeline import load_interactions, split_interactions
from common.evaluation import EvalProtocol, evaluation_sums, summarize
from common.privacy import distributed as dd
from common.privacy.accounting import calibrate_noise, default_delta
from common.run_config import Scalar, load_default_run_config
from common.rundir import RunDir
from common.silo_reports import pooled_evaluation
from server.report import append_silo_evaluation
from simulations.centralized import Popularity
from simulations.inprocess import run_inprocess

DISTRIBUTED: dict[str, Scalar] = {
    "privacy.mode": "distributed",
    "strategy.norm-action": "none",
    "strategy.reject-opposed": False,
    "privacy.distributed.noise-multiplier": 0.0,
}
PRESETS: dict[str, dict[str, Any]] = {
    "ml100k": {
        "silos": 5,
        "base": {
            "data.dataset": "ml-100k",
            "num-server-rounds": 4,
            "model.dim": 8,
            "train.lr": 0.002,
            "train.l2": 0.0,
            "eval.every": 1,
            "eval.full-ranking": False,
        },
        # Chosen on validation at ε = 8 and at σ ≈ 0 among 10 short runs, then the anchor on the
        # released DP histogram among ~20 runs at ε = 1, 2, 4, 8, then the frozen content columns
        # among ~25, then the genre and year blocks of the content table among ~40
        # (docs/secure-aggregation.md).
        "distributed": {
            "privacy.distributed.users-per-round": 943.0,
            "privacy.distributed.clip": 0.5,
            "privacy.distributed.lr": 2.0,
            "train.local-epochs": 10,
            "privacy.distributed.server-lr": 100.0,
            "privacy.distributed.server-momentum": 0.0,
            "privacy.distributed.user-steps": 60,
            "privacy.distributed.user-lr": 0.1,
            "privacy.distributed.user-l2": 0.1,
            "privacy.distributed.freeze-biases": True,
            "privacy.distributed.popularity-epsilon-fraction": 0.5,
            "privacy.distributed.popularity-bias-scale": 0.7,
            "num-server-rounds": 8,
            # the item table starts from the catalogue's content (public: PCA of the titles' and
            # genres' text embeddings); its first 32 columns stay there (public, never noised) and
            # only the last 8 learn under DP, so every user's own row, fitted without noise in its
            # silo, ranks by taste on 32 content columns from round 1
            "model.dim": 40,
            "privacy.distributed.frozen-dims": 32,
            "model.item-init": "content",
            "model.item-init-std": 0.5,
            # the movies' genre flags and release years join the text embeddings before the
            # components are taken (public catalogue metadata; chosen on validation at ε = 8)
            "model.item-init-genre-weight": 6.0,
            "model.item-init-year-weight": 12.0,
        },
        # Small ε: most of ε on the histogram, and only items whose DP count stands well above
        # the noise move (κ = 10); two rounds.
        "per-epsilon": {
            eps: {
                "privacy.distributed.popularity-epsilon-fraction": 0.9,
                "privacy.distributed.item-step-kappa": 10.0,
                "num-server-rounds": 2,
            }
            for eps in (1.0, 2.0)
        },
    },
    "synthetic-100k": {
        "silos": 5,
        "base": {
            "data.dataset": "synthetic",
            "data.synthetic.num-users": 100_000,
            "data.synthetic.num-items": 2_000,
            "data.synthetic.mean-interactions": 20,
            "num-server-rounds": 10,
            "model.dim": 16,
            "eval.every": 5,
            "eval.full-ranking": False,
            "eval.val-users": 5000,
        },
        # DP alternating least squares (common.privacy.dp_als): on this population DP-FedAvg's
        # per-user deltas stay at the DP popularity list (docs/secure-aggregation.md); chosen on
        # validation in an offline lab of the same two steps (λ, w₀, k, rounds)
        "distributed": {
            "privacy.distributed.algorithm": "als",
            "privacy.distributed.users-per-round": 100_000.0,  # q = 1: every user, every round
            "privacy.distributed.als-max-items": 20,
            "privacy.distributed.als-reg": 1.0,
            "privacy.distributed.als-unobserved-weight": 0.1,
            "privacy.distributed.popularity": False,  # the rounds' released item counts are the DP list
            "num-server-rounds": 2,
            "eval.every": 1,
        },
    },
}


def run_point(cfg: dict[str, Scalar], silos: int, run_dir: Path) -> dict[str, Any]:
    """One federated run; pooled silo-kept metrics at the best-validation round, the server's final ε."""
    cfg = {**cfg, "run-dir": str(run_dir), "state-root": str(run_dir / "silos")}
    start = time.perf_counter()
    run_inprocess(cfg, num_nodes=silos)
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    pooled = pooled_evaluation(run_dir / "silos", 10)  # the silos' own sums: never sent to the server
    append_silo_evaluation(RunDir(run_dir), pooled, 10)  # report.md: the model beside the DP popularity list
    evaluated = []
    for r in rounds:
        metrics = r["evaluate"] if "val-hr@10" in r["evaluate"] else pooled.get(r["round"])
        if metrics and "val-hr@10" in metrics:
            evaluated.append((r["round"], metrics))
    best_round, best = max(evaluated, key=lambda x: x[1]["val-hr@10"])
    server = [r["central-privacy"] for r in rounds if r.get("central-privacy")]
    ledger = run_dir / "ledger" / "server.jsonl"
    events = [json.loads(x) for x in ledger.read_text().splitlines()] if ledger.exists() else []
    histogram = next((e for e in events if e.get("kind") == dd.KIND_HISTOGRAM), None)
    return {
        "round": best_round,
        "val-hr@10": best["val-hr@10"],
        "test-hr@10": best["test-hr@10"],
        # the ranking by the histogram this run released (its share of ε), on the same candidates
        "run-dp-popularity-val-hr@10": best.get("dp-popularity-val-hr@10"),
        "run-dp-popularity-test-hr@10": best.get("dp-popularity-test-hr@10"),
        # each silo's recency-shifted copy (personalize.method = "recency") at the same round, when it ran
        "personalized-val-hr@10": best.get("personalized-val-hr@10"),
        "personalized-test-hr@10": best.get("personalized-test-hr@10"),
        "epsilon": server[-1]["epsilon"] if server else None,
        "delta": server[-1]["delta"] if server else None,
        "noise-multiplier": server[-1]["noise-multiplier"] if server else None,
        "sample-rate": server[-1]["sample-rate"] if server else None,
        "histogram-noise-multiplier": None if histogram is None else histogram["noise-multiplier"],
        "histogram-epsilon": None if histogram is None else histogram["epsilon"],
        "seconds": round(time.perf_counter() - start, 1),
        "rounds": len(rounds),
    }


def dp_popularity(base: dict[str, Scalar], epsilon: float, silos: int, max_dishonest: int, seed: int) -> dict[str, Any]:
    """HR@10 of the DP item-popularity ranking at ``epsilon`` (all of ε on the histogram)."""
    cfg = AppConfig.from_run_config(base)
    data = split_interactions(cfg.data, cfg.seed, load_interactions(cfg.data, cfg.seed))
    split = data.split
    delta = default_delta(split.num_users)
    sigma = calibrate_noise(1.0, 1, epsilon, delta) if math.isfinite(epsilon) else 0.0
    counts = dd.user_item_histogram(split.train_user, split.train_item, split.num_items)
    std = sigma * dd.noise_price(silos, max_dishonest)
    noisy = counts + np.random.default_rng(seed).normal(0.0, std, counts.size)
    protocol = EvalProtocol(cfg.eval.k, cfg.eval.full_ranking, cfg.eval.full_ranking_k)
    sums = evaluation_sums(Popularity(noisy), split, protocol, data.item_popularity, torch.device("cpu"))  # type: ignore[arg-type]
    metrics = summarize(sums, cfg.eval.k)
    return {"val-hr@10": metrics["val-hr@10"], "test-hr@10": metrics["test-hr@10"], "delta": delta,
            "noise-multiplier": sigma}  # fmt: skip


def main() -> None:
    """Run the grid, print the table, save JSON and a plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="ml100k")
    parser.add_argument("--data-dir", type=Path, help="MovieLens directory (ml100k preset)")
    parser.add_argument("--epsilons", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=0, help="override the preset's num-server-rounds")
    parser.add_argument("--nonprivate", action="store_true", help="also run the non-private federated model")
    parser.add_argument("--set", action="append", default=[], help="extra run-config key=value (tuning)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference", type=Path, default=None,
                        help="results.json of benchmarks.privacy_utility: its non-private and local-DP rows join the "
                             "table and the plot")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per distributed point and noise draws per DP popularity point (mean, sd)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    base: dict[str, Scalar] = {**load_default_run_config(), **preset["base"]}
    if args.data_dir is not None:
        base["data.path"] = str(args.data_dir.resolve())
    if args.rounds:
        base["num-server-rounds"] = args.rounds
    extra: dict[str, Scalar] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key] = json.loads(value) if value[:1] in "-0123456789tf[" else value
    out = args.out or Path(tempfile.mkdtemp(prefix=f"fedrec-distributed-{args.preset}-"))
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    silos = preset["silos"]
    t = int(load_default_run_config()["privacy.distributed.max-dishonest-silos"])  # type: ignore[call-overload]

    def record(mode: str, eps: float, metrics: dict[str, Any]) -> None:
        results.append({"mode": mode, "target-epsilon": eps, **metrics})
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"{mode:>12} ε={eps:<5g} val HR@10 {metrics['val-hr@10']:.4f} test HR@10 {metrics['test-hr@10']:.4f} "
              f"({metrics.get('seconds', '-')} s)", flush=True)  # fmt: skip

    record("popularity", math.inf, dp_popularity(base, math.inf, silos, t, 0))
    if args.reference is not None:  # measured by benchmarks.privacy_utility (its own preset), named as such
        for row in json.loads(args.reference.read_text()):
            if row.get("mode") in ("none", "local"):
                mode = "reference-none" if row["mode"] == "none" else "local"
                record(mode, float(row["target-epsilon"]), {**{k: v for k, v in row.items() if k != "mode"},
                                                            "delta": row.get("delta-local"),
                                                            "source": str(args.reference)})  # fmt: skip
    if args.nonprivate:  # the same head on the non-private run when --set asks for personalization
        same = {k: v for k, v in extra.items() if k.startswith("personalize.")}
        record("none", math.inf, run_point({**base, **same}, silos, out / "nonprivate"))
    for eps in (float(e) for e in args.epsilons.split(",")):
        draws = [dp_popularity(base, eps, silos, t, int(eps * 1000) + k) for k in range(args.repeats)]
        record("dp-popularity", eps, repeated(draws))
        per_eps = preset.get("per-epsilon", {}).get(eps, {})  # chosen on validation at that ε
        cfg = {**base, **DISTRIBUTED, **preset["distributed"], **per_eps, "privacy.distributed.target-epsilon": eps,
               **({"num-server-rounds": args.rounds} if args.rounds else {}), **extra}  # fmt: skip
        runs = [run_point(cfg, silos, out / f"distributed-eps{eps:g}" / f"run{k}") for k in range(args.repeats)]
        record("distributed", eps, repeated(runs))
    print_table(results, args.preset)
    plot(results, out / "distributed.png", args.preset)
    print(f"\nresults: {out / 'results.json'}; plot: {out / 'distributed.png'}")


def repeated(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The first point's fields with the HR@10s replaced by their means over ``points``, plus each run's and the sd."""
    out = dict(points[0])
    for key in ("val-hr@10", "test-hr@10", "run-dp-popularity-test-hr@10", "personalized-test-hr@10"):
        values = [p[key] for p in points if p.get(key) is not None]
        if values:
            out[key] = float(np.mean(values))
            out[f"{key}-runs"] = values
            out[f"{key}-sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    out["round"] = "/".join(str(p.get("round", "-")) for p in points)
    out["seconds"] = round(sum(p.get("seconds", 0.0) for p in points), 1)
    return out


def print_table(results: list[dict[str, Any]], name: str) -> None:
    """Markdown table."""
    print(f"\n{name}: distributed user-level DP (union of silos) vs DP popularity")
    ref = max((r["test-hr@10"] for r in results if r["mode"] in ("none", "reference-none")), default=None)
    # with personalize.method = "recency" (--set): each silo's shifted copy at the same round, and its share
    # of the non-private run's own shifted copy (the same head on both sides)
    head = any(r.get("personalized-test-hr@10") is not None for r in results)
    head_ref = max((r["personalized-test-hr@10"] for r in results if r["mode"] in ("none", "reference-none")
                    and r.get("personalized-test-hr@10") is not None), default=None)  # fmt: skip
    extra = " recency copy's test HR@10 | % of non-private's recency copy |" if head else ""
    print("| mode | target ε | δ | σ | q | best round | val HR@10 | test HR@10 (mean ± sd over the repeats) | "
          f"% of non-private | run's DP-popularity test HR@10 |{extra}")
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if head else ""))
    for r in results:
        eps = "∞" if math.isinf(r["target-epsilon"]) else f"{r['target-epsilon']:g}"
        delta = f"{r['delta']:.1e}" if r.get("delta") else "-"
        sigma = f"{r['noise-multiplier']:.3f}" if r.get("noise-multiplier") else "-"
        q = f"{r['sample-rate']:.3f}" if r.get("sample-rate") else "-"
        own = r.get("run-dp-popularity-test-hr@10")
        sd = f" ± {r['test-hr@10-sd']:.4f}" if len(r.get("test-hr@10-runs", [])) > 1 else ""
        share = f"{r['test-hr@10'] / ref:.1%}" if ref else "-"
        print(f"| {r['mode']} | {eps} | {delta} | {sigma} | {q} | {r.get('round', '-')} | "
              f"{r['val-hr@10']:.4f} | {r['test-hr@10']:.4f}{sd} | {share} | "
              f"{'-' if own is None else f'{own:.4f}'} |", end="")  # fmt: skip
        mine = r.get("personalized-test-hr@10")
        if head:
            print(f" {'-' if mine is None else f'{mine:.4f}'} | "
                  f"{f'{mine / head_ref:.1%}' if mine is not None and head_ref else '-'} |", end="")  # fmt: skip
        print()


def plot(results: list[dict[str, Any]], path: Path, name: str) -> None:
    """HR@10 against ε for distributed DP and DP popularity, with the non-private lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for mode, style in (("distributed", "-o"), ("dp-popularity", "-s"), ("local", "-^")):
        pts = [(r["target-epsilon"], r["test-hr@10"]) for r in results if r["mode"] == mode]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=f"{mode} DP" if mode != "dp-popularity" else "DP popularity")
    labels = {"none": "non-private", "reference-none": "non-private (privacy_utility)", "popularity": "popularity"}
    for mode, style in (("none", "--"), ("reference-none", "--"), ("popularity", ":")):
        value = next((r["test-hr@10"] for r in results if r["mode"] == mode), None)
        if value is not None:
            ax.axhline(value, linestyle=style, color="grey", label=labels[mode])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ε (user-level, union of all silos' users)")
    ax.set_ylabel("test HR@10")
    ax.set_title(f"distributed DP, {name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
