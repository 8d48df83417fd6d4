"""Peak memory of full-ranking evaluation under a memory budget (``eval.memory-mb``).

    python -m benchmarks.eval_memory                      # NeuMF, 2,000 users x 20,000 items
    python -m benchmarks.eval_memory --budgets 128,512 --users 500 --items 5000

What is measured
----------------
:func:`common.evaluation.evaluation_sums` (sampled protocol on validation and
test, full ranking on test) of an untrained NeuMF (d = 64, MLP 64-32-16, the
defaults) on a synthetic split: every user has 20 training items, one
validation and one test item (all distinct) and 99 sampled negatives. Each
budget runs in a fresh interpreter; its peak RSS is that child's high-water mark
(``os.wait4``'s resource usage of that child), i.e. the whole process tree of the evaluation, including
torch itself. Every budget must give the same sums (the block sizes do not
change the metrics); the table says whether they did. One torch thread.

Target (issue 15): peak RSS below 2 GiB at 2,000 users x 20,000 items.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
TRAIN_PER_USER = 20
NEGATIVES = 99


def synthetic_split(users: int, items: int, seed: int = 0):  # noqa: ANN201 - UserSplit (imported lazily)
    """A random split: TRAIN_PER_USER train items, one val and one test item per user (all distinct)."""
    from common.data.split import UserSplit

    rng = np.random.default_rng(seed)
    picked = np.stack([rng.choice(items, TRAIN_PER_USER + 2, replace=False) for _ in range(users)])
    return UserSplit(
        num_items=items,
        train_user=np.repeat(np.arange(users, dtype=np.int64), TRAIN_PER_USER),
        train_item=picked[:, :TRAIN_PER_USER].reshape(-1).astype(np.int64),
        val_item=picked[:, TRAIN_PER_USER].astype(np.int64),
        test_item=picked[:, TRAIN_PER_USER + 1].astype(np.int64),
        val_negatives=rng.integers(0, items, (users, NEGATIVES)),
        test_negatives=rng.integers(0, items, (users, NEGATIVES)),
        user_global_idx=np.arange(users, dtype=np.int64),
    )


def run_one(model_name: str, users: int, items: int, memory_mb: float) -> dict[str, object]:
    """Evaluate once in this process; return the sums and the seconds taken."""
    import torch

    from common.evaluation import EvalProtocol, evaluation_sums
    from common.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    split = synthetic_split(users, items)
    model = build_model(model_name, users, items, 64)  # type: ignore[arg-type]
    popularity = np.bincount(split.train_item, minlength=items).astype(np.float64)
    start = time.process_time()
    sums = evaluation_sums(model, split, EvalProtocol(memory_mb=memory_mb), popularity, torch.device("cpu"))
    return {"sums": sums, "cpu_s": time.process_time() - start}


def run_isolated(model_name: str, users: int, items: int, memory_mb: float) -> dict[str, object]:
    """:func:`run_one` in a fresh interpreter; adds the child's peak RSS in bytes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    spec = json.dumps([model_name, users, items, memory_mb])
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.eval_memory", "--one", spec],
            stdout=subprocess.PIPE, stderr=errors, text=True, cwd=ROOT, env=env,
        )
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
        proc.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        err = errors.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"budget {memory_mb} MiB failed: {err.strip().splitlines()[-1:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_bytes"] = usage.ru_maxrss * 1024  # Linux: KiB; this child (and its waited-for children)
    return result


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    """Run every budget, print the table and the target."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="neumf", choices=("mf", "neumf"))
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--budgets", default="1024,512,128", help="eval.memory-mb values, largest first")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*json.loads(args.one))))  # noqa: T201
        return []
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    load = os.getloadavg()[0]
    rows = []
    for budget in budgets:
        result = run_isolated(args.model, args.users, args.items, budget)
        rows.append({"budget": budget, **result})
    reference = rows[0]["sums"]
    print(f"Full-ranking evaluation, {args.model}, {args.users:,} users x {args.items:,} items, 1 thread; "
          f"1-min load {load:.1f} -> {os.getloadavg()[0]:.1f}\n")
    print("| eval.memory-mb | peak RSS of the tree (MiB) | CPU s | sums equal to the first row |")
    print("|---:|---:|---:|---|")
    for row in rows:
        peak = int(row["peak_bytes"])  # type: ignore[call-overload]
        shown = f"{peak / 2**20:.0f}"
        print(f"| {row['budget']:g} | {shown} | {row['cpu_s']:.1f} | {'yes' if row['sums'] == reference else 'NO'} |")
    worst = max(int(r["peak_bytes"]) for r in rows)  # type: ignore[call-overload]
    verdict = "MET" if worst < 2 * GIB else f"MISSED by {(worst - 2 * GIB) / 2**20:.0f} MiB"
    print(f"\nTarget: peak RSS < 2 GiB → {verdict} (largest {worst / 2**20:.0f} MiB); "
          f"metrics identical across budgets: {all(r['sums'] == reference for r in rows)}")
    return rows


if __name__ == "__main__":
    main()
