"""Fold-in of new users on MovieLens-100K: held-out users fitted against the frozen shared model.

10% of the users (a seeded random subset) are held out of training entirely: run B
trains (in-process runtime, 5 silos, default MF, non-private) with those users removed
from their silos' data; each held-out user's row is then folded in from their
training interactions against run B's final shared model (:mod:`serving.foldin`).
Their test HR@10 / NDCG@10 (sampled protocol: the test item among the same 99 fixed
negatives, ties count against it) is compared with run A, where the same users are
trained in as usual, and with popularity. Time per user: one fold-in alone, on CPU.

    python -m benchmarks.foldin --data-dir ../shared/data/ml-100k
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import client.data
from common.config import AppConfig
from common.data.pipeline import load_interactions, split_interactions
from common.data.silo import SiloData
from common.data.split import NO_ITEM
from common.personalization import RECENT_ITEMS, RECENT_WEIGHTS
from common.recency import ITEM_ROWS, history_profile
from common.run_config import load_default_run_config
from common.storage import load_arrays
from serving import scoring
from serving.foldin import fold_in
from serving.silo import ServedSilo
from serving.sources import open_source
from simulations.inprocess import run_inprocess


def hr_ndcg(pos: np.ndarray, neg: np.ndarray, k: int = 10) -> tuple[float, float]:
    """Mean HR@k and NDCG@k of positives (U,) against negatives (U, n); ties count against."""
    rank = (neg >= pos[:, None]).sum(1)
    hit = rank < k
    return float(hit.mean()), float((hit / np.log2(rank + 2)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--silos", type=int, default=5)
    parser.add_argument("--holdout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="draws the held-out users")
    parser.add_argument("--rounds", type=int, default=None, help="default: num-server-rounds of pyproject.toml")
    parser.add_argument("--work", type=Path, default=None, help="work directory (its finished runs are reused)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    base = load_default_run_config()
    base.update({"data.dataset": "ml-100k", "data.path": str(args.data_dir.resolve()), "eval.full-ranking": False})
    if args.rounds:
        base["num-server-rounds"] = args.rounds
    base["eval.every"] = base["num-server-rounds"]  # evaluate the last round only (not used here)
    cfg = AppConfig.from_run_config(base)
    interactions = load_interactions(cfg.data, cfg.seed)
    pooled = split_interactions(cfg.data, cfg.seed, interactions)
    split = pooled.split
    rng = np.random.default_rng(args.seed)
    held = np.sort(rng.choice(split.num_users, size=round(args.holdout * split.num_users), replace=False))
    held = held[split.test_item[held] != NO_ITEM]
    held_set = set(held.tolist())
    work = args.work or Path(tempfile.mkdtemp(prefix="foldin-"))

    seconds: dict[str, float] = {}
    original = client.data.load_silo_data

    def without_held(*a, **kw):  # type: ignore[no-untyped-def]
        data = original(*a, **kw)
        keep = np.flatnonzero([g not in held_set for g in data.split.user_global_idx])
        return SiloData(data.split.subset(keep), data.item_popularity)

    for name in ("trained-in", "held-out"):
        if (work / name / "final.npz").is_file():  # --work of an earlier call: reuse its finished runs
            seconds[name] = float("nan")
            continue
        client.data.load_silo_data = without_held if name == "held-out" else original
        try:
            t = time.perf_counter()
            run_inprocess({**base, "run-dir": str(work / name)}, args.silos)
            seconds[name] = time.perf_counter() - t
        finally:
            client.data.load_silo_data = original

    candidates = np.concatenate([split.test_item[held, None], split.test_negatives[held]], axis=1)

    # Trained in: each held-out user's own row, from its silo in run A.
    val_candidates = np.concatenate([split.val_item[held, None], split.val_negatives[held]], axis=1)
    trained, own_val = np.empty(candidates.shape), np.empty(val_candidates.shape)
    served: dict[int, tuple[ServedSilo, dict[str, int]]] = {}
    for j, u in enumerate(held):
        raw = str(interactions.user_ids[u])
        silo = next((k for k, (_, rows) in served.items() if raw in rows), None)
        if silo is None:
            s = open_source(work / "trained-in", user=raw)
            served[s.silo] = (s, {str(x): r for r, x in enumerate(s.user_ids)})
            silo = s.silo
        s, rows = served[silo]
        scores = scoring.score(s.kind, s.shared, s.users, np.array([rows[raw]]))[0]
        trained[j], own_val[j] = scores[candidates[j]], scores[val_candidates[j]]

    # Fold-in: rows fitted against run B's final shared model, one user at a time.
    record = load_arrays(work / "held-out" / "final.npz")
    shared = {name: record[name].numpy().astype(np.float32) for name in record}
    kind = scoring.model_kind(shared, "run B")
    train = {"loss": cfg.train.loss, "l2": cfg.train.l2, "num-negatives": cfg.train.num_negatives}
    folded = np.empty(candidates.shape)
    times = []
    for j, u in enumerate(held):
        history = split.train_item[split.train_user == u]
        t = time.perf_counter()
        rows = fold_in(kind, shared, [history], train, seed=int(u))
        times.append(time.perf_counter() - t)
        folded[j] = scoring.score(kind, shared, rows, np.array([0]))[0][candidates[j]]

    # The recency shift (personalize.method = "recency"): each row moved toward the unit rows of the
    # user's last m training items; one (m, β) chosen on these users' validation items (trained in),
    # then applied to both the trained-in and the folded-in rows.
    histories = [split.train_item[split.train_user == u] for u in held]
    q_a, q_b = next(iter(served.values()))[0].shared[ITEM_ROWS], shared[ITEM_ROWS]  # run A's and run B's items

    def val_hr(mw: tuple[int, float]) -> float:
        shifted = own_val + mw[1] * term(q_a, mw[0], val_candidates)
        return hr_ndcg(shifted[:, 0], shifted[:, 1:])[0]

    def term(q: np.ndarray, m: int, cand: np.ndarray) -> np.ndarray:
        profiles = np.stack([history_profile(h, q, m) for h in histories])
        return np.einsum("ud,und->un", profiles, q[cand])

    grid = [(m, w) for m in RECENT_ITEMS for w in RECENT_WEIGHTS]
    m, weight = max(grid, key=val_hr)
    trained_shift = trained + weight * term(q_a, m, candidates)
    folded_shift = folded + weight * term(q_b, m, candidates)

    popularity = pooled.item_popularity[candidates]
    print(f"held-out users: {len(held)} of {split.num_users} (seed {args.seed}); "
          f"training: {seconds['trained-in']:.0f} s (A), {seconds['held-out']:.0f} s (B) (nan: reused); work dir {work}")
    print()
    print("| held-out users scored by | HR@10 | NDCG@10 | ms per user |")
    print("|---|---|---|---|")
    for name, s, ms in (
        ("trained in (run A, their own rows)", trained, "-"),
        ("fold-in (run B, rows fitted after training)", folded, f"{1000 * np.median(times):.1f} (median), {1000 * np.mean(times):.1f} (mean)"),
        (f"trained in + recency shift (m = {m}, β = {weight:g}, chosen on their validation items)", trained_shift, "-"),
        ("fold-in + the same recency shift", folded_shift, "-"),
        ("popularity", popularity, "-"),
    ):
        hr, ndcg = hr_ndcg(s[:, 0], s[:, 1:])
        print(f"| {name} | {hr:.4f} | {ndcg:.4f} | {ms} |")


if __name__ == "__main__":
    main()
