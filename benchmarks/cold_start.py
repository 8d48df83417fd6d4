"""Cold start on MovieLens-100K: items nobody interacted with, scored from their text.

    python -m benchmarks.cold_start --data-dir ../shared/data/ml-100k

Protocol (docs/cold-start.md): a seeded random ``--cold-fraction`` of the items is
held out entirely (every interaction with them leaves training); models train on
the rest (the *warm* log, its own leave-one-out split). Each user with held-out
cold interactions is then evaluated on them:

* cold HR@10 / NDCG@10 *among cold items*: one seeded cold positive of the user
  against 99 cold items the user never interacted with;
* cold HR@10 *among all items*: the same positive against 99 items of the whole
  catalogue the user never interacted with;
* cold Recall@20, full ranking: top 20 of every item the user has not trained on,
  hits / min(20, the user's cold positives);
* warm HR@10: the warm split's usual sampled test (leave-one-out, 99 negatives).

Rows: hybrid-mf (MF + projected all-MiniLM-L6-v2 text embedding of "title. Genres:
..."), plain MF (a new item keeps its random initial row), popularity (a cold item
has no count: ties broken at random), random, and content-only kNN (score = mean
cosine between the item's text embedding and those of the user's training items).
Centralized (Adam, best warm-validation epoch) and federated (5 IID silos through
fedrec's real ServerApp/ClientApps on the in-process grid, final round), and
federated under local user-level DP at ε = 8 per silo.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from common import records
from common.config import AppConfig
from common.content import model_for
from common.data.datasets import load_dataset
from common.data.items import catalogue_texts, read_movielens_items
from common.data.pipeline import load_interactions, split_interactions
from common.data.schema import Interactions
from common.data.text_embeddings import encode_texts
from common.evaluation import EvalProtocol, evaluation_sums, summarize
from common.models import Recommender, build_model
from common.run_config import Scalar, load_default_run_config
from common.seeding import derive_seed, numpy_rng
from common.storage import load_arrays
from common.training import train_epochs

K, FULL_K, NEGATIVES = 10, 20, 99
#: ML-100K MF hyperparameters (simulations/configs/ml100k-mf.toml), used for both models.
BASE: dict[str, Scalar] = {"model.dim": 32, "train.lr": 0.002, "train.l2": 0.01, "train.num-negatives": 4,
                           "train.batch-size": 256, "eval.full-ranking": False}
#: Local DP at ε = 8: the ML-100K preset of benchmarks/privacy_utility.py.
PRIVATE: dict[str, Scalar] = {"privacy.mode": "local", "privacy.local.target-epsilon": 8.0, "privacy.local.noise-multiplier": 0.0,
                              "privacy.local.batch-size": 32, "privacy.local.optimizer.lr": 0.5,
                              "privacy.local.optimizer.user-lr": 0.05, "privacy.local.optimizer.user-epochs": 3,
                              "train.lr": 0.02, "privacy.local.clip": 1.0, "model.dim": 16}


# ----------------------------------------------------------------------------- protocol
class ColdProtocol:
    """The held-out cold items and each user's evaluation candidates, in the eval catalogue.

    The eval catalogue is the warm catalogue (indices of the warm log) followed by
    the cold items; users are those of the warm log.
    """

    def __init__(self, full: Interactions, warm: Interactions, cold_ids: list[str], seed: int) -> None:
        self.num_warm = warm.num_items
        self.item_ids = [*map(str, warm.item_ids), *cold_ids]
        self.num_items = len(self.item_ids)
        index = {item: i for i, item in enumerate(self.item_ids)}
        user_index = {u: i for i, u in enumerate(map(str, warm.user_ids))}
        self.num_users = warm.num_users
        seen = np.zeros((self.num_users, self.num_items), dtype=bool)  # every interaction, warm or cold
        cold_pos: list[list[int]] = [[] for _ in range(self.num_users)]
        for u, i in zip(full.user_ids[full.user_idx], full.item_ids[full.item_idx], strict=True):
            uu = user_index.get(str(u))
            if uu is None:
                continue  # a user whose every interaction is with cold items: no row to score
            ii = index[str(i)]
            seen[uu, ii] = True
            if ii >= self.num_warm and ii not in cold_pos[uu]:
                cold_pos[uu].append(ii)
        self.seen = seen
        self.train = np.zeros_like(seen)
        self.train[warm.user_idx, warm.item_idx] = True
        self.cold_positives = cold_pos
        rng = np.random.default_rng(derive_seed(seed, "cold-eval"))
        self.users = np.array([u for u in range(self.num_users) if cold_pos[u]], dtype=np.int64)
        cold = np.arange(self.num_warm, self.num_items)
        self.positive = np.empty(len(self.users), dtype=np.int64)
        self.cold_candidates: list[np.ndarray] = []
        self.all_candidates: list[np.ndarray] = []
        for j, u in enumerate(self.users):
            self.positive[j] = rng.choice(cold_pos[u])
            unseen_cold = cold[~seen[u, cold]]
            unseen_all = np.flatnonzero(~seen[u])
            self.cold_candidates.append(rng.choice(unseen_cold, min(NEGATIVES, len(unseen_cold)), replace=False))
            self.all_candidates.append(rng.choice(unseen_all, min(NEGATIVES, len(unseen_all)), replace=False))

    def metrics(self, scores: np.ndarray) -> dict[str, float]:
        """Cold-item metrics of a score matrix (users of the warm log, eval catalogue)."""
        hr_c, ndcg_c, hr_a, rec = [], [], [], []
        for j, u in enumerate(self.users):
            s = scores[u]
            pos = s[self.positive[j]]
            rank_c = int((s[self.cold_candidates[j]] >= pos).sum())  # ties count against the positive
            rank_a = int((s[self.all_candidates[j]] >= pos).sum())
            hr_c.append(rank_c < K)
            ndcg_c.append(1.0 / np.log2(rank_c + 2) if rank_c < K else 0.0)
            hr_a.append(rank_a < K)
            candidates = np.flatnonzero(~self.train[u])  # every item the user has not trained on
            top = candidates[np.argsort(-s[candidates], kind="stable")[:FULL_K]]
            relevant = self.cold_positives[u]
            rec.append(len(set(top.tolist()) & set(relevant)) / min(FULL_K, len(relevant)))
        return {"cold-hr@10": float(np.mean(hr_c)), "cold-ndcg@10": float(np.mean(ndcg_c)),
                "cold-hr@10-all": float(np.mean(hr_a)), "cold-recall@20": float(np.mean(rec))}


def cold_split(full: Interactions, fraction: float, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """The warm log (a frame of user_id, item_id, timestamp) and the held-out cold item ids."""
    rng = np.random.default_rng(derive_seed(seed, "cold-items"))
    cold = np.sort(rng.choice(full.num_items, int(round(fraction * full.num_items)), replace=False))
    keep = ~np.isin(full.item_idx, cold)
    frame = pd.DataFrame({"user_id": full.user_ids[full.user_idx[keep]].astype(str),
                          "item_id": full.item_ids[full.item_idx[keep]].astype(str),
                          "timestamp": full.timestamp[keep]})
    return frame, [str(i) for i in full.item_ids[cold]]


# ----------------------------------------------------------------------------- models on the eval catalogue
def extend(model: Recommender, name: str, dim: int, protocol: ColdProtocol, text_all: torch.Tensor,
           seed: int) -> Recommender:
    """The trained warm model on the eval catalogue: cold items keep a fresh initial row.

    Plain MF: N(0, 0.1²) rows (its initialisation), bias 0. hybrid-mf: free row 0
    (its initialisation), bias 0, so a cold item is scored by ``W t_i`` alone.
    """
    torch.manual_seed(derive_seed(seed, "cold-rows"))
    big = build_model(name, protocol.num_users, protocol.num_items, dim,  # type: ignore[arg-type]
                      item_text=text_all if name == "hybrid-mf" else None)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    new = big.state_dict()
    for key, value in state.items():
        if key.startswith("item_") and key.split(".")[0] in model.item_tables:
            new[key][: protocol.num_warm] = value
        else:
            new[key] = value
    big.load_state_dict(new, strict=False)
    return big.eval()


def score_matrix(model: Recommender, users: int) -> np.ndarray:
    """Scores (U, I) of every user for every item."""
    with torch.no_grad():
        return model.cpu().score_all(torch.arange(users)).numpy()


# ----------------------------------------------------------------------------- training
def centralized(cfg: AppConfig, epochs: int) -> tuple[Recommender, dict[str, float], int]:
    """Train on the pooled warm log; the model, warm metrics at the best-validation epoch, that epoch."""
    data = split_interactions(cfg.data, cfg.seed, load_interactions(cfg.data, cfg.seed))
    torch.manual_seed(derive_seed(cfg.seed, "centralized-init"))
    model = model_for(cfg, data.split.num_users, data.split.num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    protocol = EvalProtocol(K, False, FULL_K)
    best: tuple[float, dict[str, Any], dict[str, float], int] = (-1.0, {}, {}, 0)
    for epoch in range(1, epochs + 1):
        train_epochs(model, data.split, cfg.train, epochs=1, rng=numpy_rng(cfg.seed, "centralized", epoch),
                     device=torch.device("cpu"), optimizer=optimizer)
        m = summarize(evaluation_sums(model, data.split, protocol, data.item_popularity, torch.device("cpu")), K)
        if m["val-hr@10"] > best[0]:
            best = (m["val-hr@10"], copy.deepcopy(model.state_dict()), m, epoch)
    model.load_state_dict(best[1])
    return model, best[2], best[3]


def federated(run_config: dict[str, Scalar], silos: int, run_dir: Path) -> tuple[Recommender, dict[str, float], int]:
    """A federated run (in-process grid); the final model with every silo's user rows, its warm metrics."""
    from simulations.inprocess import run_inprocess

    grid = run_inprocess({**run_config, "run-dir": str(run_dir)}, num_nodes=silos)
    cfg = AppConfig.from_run_config(run_config)
    warm = load_interactions(cfg.data, cfg.seed)
    model = model_for(cfg, warm.num_users, warm.num_items)
    state = model.state_dict()
    for name, arr in load_arrays(run_dir / "final.npz").items():
        state[name] = torch.from_numpy(arr.numpy().copy())
    for context in grid.contexts.values():
        users = context.state.array_records[records.STATE_SILO_DATA]["user_global_idx"].numpy()
        rows = context.state.array_records[records.STATE_USER_PARAMS].to_torch_state_dict()
        for name, value in rows.items():
            state[name][torch.from_numpy(users)] = value
    model.load_state_dict(state)
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Under DP the silos withhold evaluation sums (privacy.release.evaluation): warm metrics
    # are then only the harness's own, from the assembled model (as for every row).
    return model, {}, int(rounds[-1]["round"])


# ----------------------------------------------------------------------------- main
def main() -> None:
    """Run every row and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--cold-fraction", type=float, default=0.15)
    parser.add_argument("--epochs", type=int, default=25, help="centralized epochs (best warm validation kept)")
    parser.add_argument("--rounds", type=int, default=40, help="federated rounds (non-private)")
    parser.add_argument("--dp-rounds", type=int, default=30, help="federated rounds under local DP")
    parser.add_argument("--silos", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--encoder", default="all-MiniLM-L6-v2")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--skip", default="", help="comma list of: centralized,federated,dp")
    parser.add_argument("--models", default="mf,hybrid-mf", help="learned models to run (comma list)")
    args = parser.parse_args()
    if not 0.10 <= args.cold_fraction <= 0.20:
        parser.error("--cold-fraction: the protocol holds out 10-20% of the items")
    torch.set_num_threads(1)
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="fedrec-cold-"))
    full = load_dataset("ml-100k", args.data_dir.resolve())
    frame, cold_ids = cold_split(full, args.cold_fraction, args.seed)
    frame.to_parquet(work / "warm.parquet", index=False)
    texts = read_movielens_items("ml-100k", args.data_dir.resolve())
    pd.DataFrame({"item_id": list(texts), "text": list(texts.values())}).to_parquet(work / "items.parquet", index=False)
    cache = args.cache_dir or (work / "text-cache")
    base: dict[str, Scalar] = {
        **load_default_run_config(), **BASE, "seed": args.seed,
        "data.dataset": "parquet", "data.path": str(work / "warm.parquet"),
        "items.path": str(work / "items.parquet"), "items.id-col": "item_id", "items.text-cols": "text",
        "items.encoder": args.encoder, "items.cache-dir": str(cache), "items.device": "cpu",
    }
    cfg = AppConfig.from_run_config(base)
    warm = load_interactions(cfg.data, cfg.seed)
    protocol = ColdProtocol(full, warm, cold_ids, args.seed)
    all_texts, _ = catalogue_texts(protocol.item_ids, texts)
    # Encoding cost: a cold cache, then the same call again (cache hit, no model loaded).
    first = encode_texts(all_texts, args.encoder, cache_dir=cache, device="cpu")
    second = encode_texts(all_texts, args.encoder, cache_dir=cache, device="cpu")
    text_all = torch.from_numpy(first.embeddings)
    print(f"items: {full.num_items} ({len(cold_ids)} cold = {args.cold_fraction:.0%}), users {warm.num_users}, "
          f"cold test users {len(protocol.users)}; warm interactions {len(frame)} of {len(full)}", flush=True)
    print(f"encoding: {len(all_texts)} texts in {first.seconds:.1f} s = {first.items_per_second:.0f} items/s on CPU "
          f"(1 thread, cache hit on first call: {first.cache_hit}); second call: cache hit {second.cache_hit}", flush=True)

    rows: list[tuple[str, str, dict[str, float], str]] = []

    def add(model_name: str, how: str, scores: np.ndarray, warm_metrics: dict[str, float], at: str) -> None:
        warm_metrics = warm_metrics or _sampled(scores, data)
        m = {**protocol.metrics(scores), "warm-hr@10": warm_metrics["test-hr@10"],
             "warm-ndcg@10": warm_metrics["test-ndcg@10"]}
        rows.append((model_name, how, m, at))
        print(f"{model_name:>12} {how:<22} " + " ".join(f"{k} {v:.4f}" for k, v in m.items()) + f"  ({at})", flush=True)

    # Non-learned rows.
    pop = np.zeros(protocol.num_items)
    pop[: protocol.num_warm] = np.bincount(warm.item_idx, minlength=protocol.num_warm)
    jitter = np.random.default_rng(derive_seed(args.seed, "ties")).random((protocol.num_users, protocol.num_items))
    data = split_interactions(cfg.data, cfg.seed, load_interactions(cfg.data, cfg.seed))
    pop_warm = _sampled(pop[None, :].repeat(protocol.num_users, 0) + 1e-6 * jitter, data)
    add("popularity", "–", pop[None, :] + 1e-6 * jitter, pop_warm, "–")
    rand = np.random.default_rng(derive_seed(args.seed, "random")).random((protocol.num_users, protocol.num_items))
    add("random", "–", rand, _sampled(rand, data), "–")
    t = text_all.numpy()
    profile = np.zeros((protocol.num_users, t.shape[1]), dtype=np.float32)
    np.add.at(profile, warm.user_idx, t[warm.item_idx])
    profile /= np.maximum(protocol.train.sum(1, keepdims=True), 1)
    knn = profile @ t.T
    add("content-kNN", "–", knn, _sampled(knn, data), "–")

    learned: list[tuple[str, str, Callable[[str], tuple[Recommender, dict[str, float], int]], int]] = []
    if "centralized" not in skip:
        for name in args.models.split(","):
            learned.append((name, "centralized", lambda n: centralized(
                AppConfig.from_run_config({**base, "model.name": n}), args.epochs), int(base["model.dim"])))
    if "federated" not in skip:
        for name in args.models.split(","):
            learned.append((name, f"federated, {args.silos} silos", lambda n: federated(
                {**base, "model.name": n, "num-server-rounds": args.rounds, "eval.every": args.rounds},
                args.silos, work / f"fed-{n}"), int(base["model.dim"])))
    if "dp" not in skip:
        for name in args.models.split(","):
            learned.append((name, "federated, local DP ε=8", lambda n: federated(
                {**base, **PRIVATE, "model.name": n, "num-server-rounds": args.dp_rounds, "eval.every": args.dp_rounds},
                args.silos, work / f"dp-{n}"), int(PRIVATE["model.dim"])))
    timings = {}
    for name, how, train, dim in learned:
        start = time.perf_counter()
        model, _, at = train(name)
        timings[(name, how)] = time.perf_counter() - start
        big = extend(model, name, dim, protocol, text_all, args.seed)
        scores = score_matrix(big, protocol.num_users)
        # Warm metrics of every learned row from its score matrix (the same sampled test as
        # fedrec's evaluation: leave-one-out, 99 negatives, ties against the positive).
        add(name, how, scores, _sampled(scores, data),
            f"{'epoch' if how == 'centralized' else 'round'} {at}, {timings[(name, how)]:.0f} s")

    print("\n| model | training | cold HR@10 (among cold) | cold NDCG@10 (among cold) | cold HR@10 (among all) "
          "| cold Recall@20 (full) | warm HR@10 | warm NDCG@10 | at |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, how, m, at in rows:
        print(f"| {name} | {how} | {m['cold-hr@10']:.4f} | {m['cold-ndcg@10']:.4f} | {m['cold-hr@10-all']:.4f} | "
              f"{m['cold-recall@20']:.4f} | {m['warm-hr@10']:.4f} | {m['warm-ndcg@10']:.4f} | {at} |")
    (work / "results.json").write_text(json.dumps([{"model": n, "training": h, **m, "at": a} for n, h, m, a in rows], indent=1))
    print(f"\nload: {os.getloadavg()}; work directory: {work}")


def _sampled(scores: np.ndarray, data: Any) -> dict[str, float]:
    """Warm sampled test HR@10/NDCG@10 of a score matrix (warm columns), ties counting against."""
    split = data.split
    ok = split.test_item >= 0
    users = np.flatnonzero(ok)
    pos = scores[users, split.test_item[users]]
    neg = scores[users[:, None], split.test_negatives[users]]
    rank = (neg >= pos[:, None]).sum(1)
    return {"test-hr@10": float((rank < K).mean()),
            "test-ndcg@10": float(np.where(rank < K, 1 / np.log2(rank + 2), 0).mean())}


if __name__ == "__main__":
    main()
