"""Federated vs centralized on MovieLens-100K: the README's benchmark table.

    python -m benchmarks.ml100k --data-dir ../shared/data/ml-100k

For each model (configs in ``simulations/configs/ml100k-<model>.toml``, chosen on
validation with ``benchmarks.tune``) it runs ``fedrec centralized`` and
``fedrec simulate`` (Flower's Ray runtime, 5 IID silos) and reports test metrics
at the epoch/round with the best validation HR@10, plus the popularity floor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "simulations" / "configs"


def fedrec(*args: str) -> None:
    """Run a fedrec command; exit with its output on failure."""
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"fedrec {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def best_federated(run_dir: Path) -> dict[str, float]:
    """Evaluation metrics of the round with the best validation HR@10."""
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = max((r for r in rounds if r["evaluate"]), key=lambda r: r["evaluate"]["val-hr@10"])
    return {"at": best["round"], **best["evaluate"]}


def best_centralized(run_dir: Path) -> dict[str, float]:
    """Metrics of the epoch with the best validation HR@10 (summary.json)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"at": summary["best-epoch"], **summary}


def main() -> None:
    """Run all and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--models", default="mf,neumf")
    parser.add_argument("--epochs", type=int, default=50, help="centralized epochs")
    parser.add_argument("--rounds", type=int, default=100, help="federated rounds")
    parser.add_argument("--silos", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedrec-ml100k-"))
    data = ["--data-dir", str(args.data_dir.resolve())]
    rows = []
    fedrec("centralized", "--dataset", "ml-100k", *data, "--model", "popularity", "--run-dir", str(work / "pop"))
    rows.append(("popularity", "centralized", best_centralized(work / "pop")))
    for model in args.models.split(","):
        cfg = str(CONFIGS / f"ml100k-{model}.toml")
        fedrec("centralized", *data, "-c", cfg, "--epochs", str(args.epochs), "--run-dir", str(work / f"c-{model}"))
        rows.append((model, "centralized", best_centralized(work / f"c-{model}")))
        fedrec("simulate", *data, "-c", cfg, "--rounds", str(args.rounds), "--silos", str(args.silos),
               "--run-dir", str(work / f"f-{model}"))
        rows.append((model, f"federated, {args.silos} silos", best_federated(work / f"f-{model}")))
    print("\n| model | training | best-val epoch/round | val HR@10 | test HR@10 | test NDCG@10 | test Recall@20 (full) |")
    print("|---|---|---|---|---|---|---|")
    for model, how, m in rows:
        print(f"| {model} | {how} | {m['at']} | {m['val-hr@10']:.4f} | {m['test-hr@10']:.4f} | "
              f"{m['test-ndcg@10']:.4f} | {m['test-full-recall@20']:.4f} |")
    print(f"\nrun directories: {work}")


if __name__ == "__main__":
    main()
