"""Grid search of centralized hyperparameters on the validation split.

    python -m benchmarks.tune --epochs 20 -c data.dataset=ml-100k \
        -c data.path=../shared/data/ml-100k -g train.lr=0.001,0.005 -g train.l2=0,0.001

Selection uses validation HR@10 only; the test column is printed for the selected
epoch of each setting (never used to choose).
"""

from __future__ import annotations

import argparse
import itertools

import torch

from cli.config import resolve_config
from simulations.centralized import best_epoch, run_centralized


def main() -> None:
    """Run the grid and print one line per setting, best validation last."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("-c", "--config", action="append", default=[], help="fixed override key=value")
    parser.add_argument("-g", "--grid", action="append", default=[], help="key=v1,v2,... to search")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    axes = [(key, values.split(",")) for key, _, values in (g.partition("=") for g in args.grid)]
    rows = []
    for combo in itertools.product(*(values for _, values in axes)):
        grid = [f"{key}={value}" for (key, _), value in zip(axes, combo, strict=True)]
        _, cfg = resolve_config([*args.config, *grid])
        best = best_epoch(run_centralized(cfg, args.epochs), cfg.eval.k)
        k = cfg.eval.k
        rows.append((best.metrics[f"val-hr@{k}"], grid, best))
        print(
            f"{' '.join(grid) or '(defaults)'}: best epoch {best.epoch} "
            f"val-hr@{k} {best.metrics[f'val-hr@{k}']:.4f} test-hr@{k} {best.metrics[f'test-hr@{k}']:.4f} "
            f"test-ndcg@{k} {best.metrics[f'test-ndcg@{k}']:.4f}",
            flush=True,
        )
    val, grid, best = max(rows, key=lambda r: r[0])
    print(f"selected on validation: {' '.join(grid)} (epoch {best.epoch}, val-hr {val:.4f})")


if __name__ == "__main__":
    main()
