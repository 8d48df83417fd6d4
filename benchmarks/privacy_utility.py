"""Privacy–utility benchmark: test HR@10 at ε ∈ {1, 2, 4, 8, ∞}, local and central DP.

    python -m benchmarks.privacy_utility --preset ml100k --data-dir ../shared/data/ml-100k
    python -m benchmarks.privacy_utility --preset synthetic-100k

Each point is one federated run through fedrec's real ServerApp and ClientApps
(in-process grid, protobuf round trip of every message). For a target ε the noise
multiplier is calibrated so that a silo that trains every planned round ends
exactly at ε (PLD accountant, zero-out relation, user-level DP; δ is the default
min(1e-5, 1/(10N)) for the silo's N users, so 1e-5 at ML-100K's ~189 users per silo;
central DP sets δ = 1e-5).
``ε = ∞`` is the non-private model (Adam, the standard trainer). The popularity
ranking is the floor a private model must beat. Test metrics are reported at the
round with the best validation HR@10 (validation picks the round; hyperparameters
come from the preset, chosen on validation).

Central DP is client-level: its unit is a whole silo. With 5 silos no useful ε is
possible; the synthetic preset's central rows use many small silos instead.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common.config import AppConfig
from common.run_config import Scalar, load_default_run_config
from common.silo_reports import pooled_evaluation
from simulations.centralized import best_epoch, run_centralized
from simulations.inprocess import run_inprocess

PRESETS: dict[str, dict[str, Any]] = {
    "ml100k": {
        "silos": 5,
        "base": {
            "data.dataset": "ml-100k",
            "num-server-rounds": 30,
            "model.dim": 32,
            "train.lr": 0.002,
            "train.l2": 0.01,
            "eval.every": 3,
            "eval.full-ranking": False,
        },
        "private": {"privacy.local.batch-size": 32, "privacy.local.optimizer.lr": 0.5, "privacy.local.optimizer.user-lr": 0.05, "privacy.local.optimizer.user-epochs": 3, "train.lr": 0.02, "privacy.local.clip": 1.0, "model.dim": 16},
        "central": {"privacy.central.sample-rate": 1.0, "privacy.central.clip": 0.5, "privacy.central.delta": 1e-5},
    },
    "synthetic-100k": {
        "silos": 5,
        "central-silos": 50,
        "base": {
            "data.dataset": "synthetic",
            "data.synthetic.num-users": 100_000,
            "data.synthetic.num-items": 2_000,
            "data.synthetic.mean-interactions": 20,
            "num-server-rounds": 5,
            "model.dim": 16,
            "eval.every": 5,
            "eval.full-ranking": False,
        },
        "private": {"privacy.local.batch-size": 512, "privacy.local.optimizer.lr": 2.0, "privacy.local.optimizer.user-lr": 0.05, "privacy.local.optimizer.user-epochs": 1, "privacy.local.clip": 1.0},
        "central": {"privacy.central.sample-rate": 0.5, "privacy.central.clip": 0.5, "privacy.central.delta": 1e-5},
    },
}


def run_point(base: dict[str, Scalar], overrides: dict[str, Scalar], silos: int, run_dir: Path) -> dict[str, Any]:
    """One federated run; metrics at the best-validation round and the final ε."""
    cfg = {**base, **overrides, "run-dir": str(run_dir), "state-root": str(run_dir / "silos")}
    start = time.perf_counter()
    run_inprocess(cfg, num_nodes=silos)
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Under DP the silos withhold their evaluation sums from the server (the release
    # policy); this simulation holds every silo, so it pools their own reports.
    pooled = pooled_evaluation(run_dir / "silos", 10)
    for r in rounds:
        if "val-hr@10" not in r["evaluate"] and r["round"] in pooled:
            r["evaluate"] = pooled[r["round"]]
    best = max((r for r in rounds if r["evaluate"].get("val-hr@10") is not None), key=lambda r: r["evaluate"]["val-hr@10"])
    local = [e for r in rounds for e in r["privacy"]]
    central = [r["central-privacy"] for r in rounds if r.get("central-privacy")]
    return {
        "round": best["round"],
        "val-hr@10": best["evaluate"]["val-hr@10"],
        "test-hr@10": best["evaluate"]["test-hr@10"],
        "test-ndcg@10": best["evaluate"]["test-ndcg@10"],
        # each silo's recency-shifted copy (personalize.method = "recency") at the same round, when it ran
        "personalized-val-hr@10": best["evaluate"].get("personalized-val-hr@10"),
        "personalized-test-hr@10": best["evaluate"].get("personalized-test-hr@10"),
        "epsilon-local-max": max((e["epsilon"] for e in local), default=None),
        "delta-local": max((e["delta"] for e in local), default=None),
        "noise-multiplier": local[-1]["noise-multiplier"] if local else None,
        "epsilon-central": central[-1]["epsilon"] if central else None,
        "delta-central": central[-1]["delta"] if central else None,
        "z": central[-1]["noise-multiplier"] if central else None,
        "seconds": round(time.perf_counter() - start, 1),
    }


def popularity(base: dict[str, Scalar]) -> dict[str, Any]:
    """The popularity ranking on the same split."""
    cfg = AppConfig.from_run_config(base)
    best = best_epoch(run_centralized(cfg, 1, model_name="popularity"), cfg.eval.k)
    return {"test-hr@10": best.metrics["test-hr@10"], "val-hr@10": best.metrics["val-hr@10"]}


def main() -> None:
    """Run the grid, print the table, save JSON and a plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--data-dir", type=Path, help="MovieLens directory (ml100k preset)")
    parser.add_argument("--epsilons", default="1,2,4,8")
    parser.add_argument("--modes", default="local,central")
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--local-delta", type=float, default=0.0, help="privacy.local.delta (0 = the default min(1e-5, 1/(10N)))"
    )
    parser.add_argument("--rounds", type=int, default=0, help="override the preset's num-server-rounds")
    parser.add_argument(
        "--lrs", default="", help="local DP: privacy.local.optimizer.lr values to try per ε; the best validation HR@10 is kept"
    )
    parser.add_argument("--set", action="append", default=[], help="extra run-config key=value for every run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    base = {**load_default_run_config(), **preset["base"]}
    for item in args.set:
        key, _, value = item.partition("=")
        base[key] = json.loads(value) if value[:1] in "-0123456789tf[" else value
    if args.data_dir is not None:
        base["data.path"] = str(args.data_dir.resolve())
    if args.rounds:
        base["num-server-rounds"] = args.rounds
    out = args.out or Path(tempfile.mkdtemp(prefix=f"fedrec-privacy-{args.preset}-"))
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []

    def record(mode: str, eps: float, metrics: dict[str, Any]) -> None:
        results.append({"mode": mode, "target-epsilon": eps, **metrics})
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"{mode:>8} ε={eps:<5g} test HR@10 {metrics['test-hr@10']:.4f}  ({metrics.get('seconds', '-')} s)", flush=True)

    record("popularity", math.inf, popularity(base))
    record("none", math.inf, run_point(base, {}, preset["silos"], out / "nonprivate"))
    for mode in args.modes.split(","):
        silos = preset.get("central-silos", preset["silos"]) if mode == "central" else preset["silos"]
        for eps in (float(e) for e in args.epsilons.split(",")):
            if mode == "local":
                over = {**preset["private"], "privacy.mode": "local", "privacy.local.noise-multiplier": 0.0, "privacy.local.target-epsilon": eps, "privacy.local.delta": args.local_delta}
            else:
                over = {**preset["central"], "privacy.mode": "central", "privacy.central.noise-multiplier": 0.0, "privacy.central.target-epsilon": eps}
            lrs = [float(x) for x in args.lrs.split(",") if x] if mode == "local" else []
            if not lrs:
                record(mode, eps, run_point(base, over, silos, out / f"{mode}-eps{eps:g}"))
                continue
            # Select the learning rate on validation; report its test metrics.
            tried = [
                {**run_point(base, {**over, "privacy.local.optimizer.lr": lr}, silos, out / f"{mode}-eps{eps:g}-lr{lr:g}"), "lr": lr}
                for lr in lrs
            ]
            record(mode, eps, max(tried, key=lambda r: r["val-hr@10"]))
    print_table(results, args.preset, preset)
    plot(results, out / "privacy_utility.png", args.preset)
    print(f"\nresults: {out / 'results.json'}; plot: {out / 'privacy_utility.png'}")


def print_table(results: list[dict[str, Any]], name: str, preset: dict[str, Any]) -> None:
    """Markdown table for the README."""
    nonprivate = next(r for r in results if r["mode"] == "none")["test-hr@10"]
    print(f"\n{name}: user-level local DP ({preset['silos']} silos) and silo-level central DP")
    print("| mode | target ε | δ | σ (or z) | lr (on val) | best round | val HR@10 | test HR@10 | % of non-private |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        delta = r.get("delta-local") or r.get("delta-central")
        noise = r.get("noise-multiplier") or r.get("z")
        print(
            f"| {r['mode']} | {'∞' if math.isinf(r['target-epsilon']) else r['target-epsilon']:} | "
            f"{f'{delta:.1e}' if delta else '-'} | {f'{noise:.3f}' if noise else '-'} | {r.get('lr', '-')} | {r.get('round', '-')} | "
            f"{r['val-hr@10']:.4f} | {r['test-hr@10']:.4f} | {100 * r['test-hr@10'] / nonprivate:.0f}% |"
        )


def plot(results: list[dict[str, Any]], path: Path, name: str) -> None:
    """HR@10 against ε per mode, with the non-private and popularity lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for mode, style in (("local", "-o"), ("central", "-s")):
        pts = [(r["target-epsilon"], r["test-hr@10"]) for r in results if r["mode"] == mode]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=f"{mode} DP")
    for mode, style in (("none", "--"), ("popularity", ":")):
        value = next(r["test-hr@10"] for r in results if r["mode"] == mode)
        ax.axhline(value, linestyle=style, color="grey", label="non-private" if mode == "none" else "popularity")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ε (user-level for local, silo-level for central)")
    ax.set_ylabel("test HR@10")
    ax.set_title(f"privacy–utility, {name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
