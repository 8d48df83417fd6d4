"""Empirical audit demonstration: a run with noise off is flagged, correct runs are not.

Runs the federation in-process (no Ray) on the default synthetic data with canaries
in silo 0, once with ``audit.unsafe-disable-noise`` (trained without noise while
the ledger claims σ) and ``--correct`` times correctly with different canary draws,
audits every run and prints one table row per run::

    python -m benchmarks.audit_demo --correct 5 --out runs/audit-demo
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from flwr.supercore.task_identity import TaskIdentity

from common.privacy.audit import audit_run
from common.privacy.audit_report import write_audit
from common.run_config import load_default_run_config
from simulations.inprocess import run_inprocess

SETTINGS = {
    "num-server-rounds": 3,
    "privacy.mode": "local",
    "privacy.local.noise-multiplier": 2.5,
    "privacy.local.delta": 1e-5,
    "privacy.local.target-epsilon": 0.0,
    "audit.canaries": 1000,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--correct", type=int, default=5, help="correct runs (different canary draws)")
    parser.add_argument("--silos", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/audit-demo"))
    args = parser.parse_args()
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    runs = [("noise off (broken)", {"audit.unsafe-disable-noise": True, "audit.seed": 100})]
    runs += [(f"correct #{i + 1}", {"audit.seed": 101 + i}) for i in range(args.correct)]
    print("| run | σ claimed | σ used | claimed ε (δ=1e-5, user) | ε_LB (95%) | guesses correct | audit |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, extra in runs:
        run_dir = args.out / name.split()[0].replace("#", "") / str(extra["audit.seed"])
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = {**load_default_run_config(), **SETTINGS, **extra, "run-dir": str(run_dir)}
        run_inprocess(cfg, num_nodes=args.silos)
        result = audit_run(run_dir)
        write_audit(result, run_dir)
        one = result.empirical["one-run"]  # type: ignore[index]
        sigma = SETTINGS["privacy.local.noise-multiplier"]
        used = 0.0 if extra.get("audit.unsafe-disable-noise") else sigma
        verdict = "FLAGGED (exit 6)" if result.exit_code == 6 else ("passed" if not result.problems else f"exit {result.exit_code}")
        print(
            f"| {name} | {sigma} | {used} | {one['claimed-epsilon']:.3f} | {one['epsilon_lb']:.3f} | "
            f"{one['v']}/{one['r']} | {verdict} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
