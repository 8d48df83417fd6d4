"""The cold-start protocol of benchmarks.cold_start: the item hold-out and hand-computed cold metrics."""

from __future__ import annotations

import numpy as np

from benchmarks import cold_start as bench
from common.data.schema import Interactions


def _log(rows: list[tuple[str, str]]) -> Interactions:
    users, items = zip(*rows, strict=True)
    return Interactions.from_external_ids(list(users), list(items), np.arange(len(rows), dtype=np.int64), source="t")


FULL = _log([("u1", "a"), ("u1", "b"), ("u1", "e"), ("u2", "a"), ("u2", "c"), ("u2", "d"), ("u2", "f")])


def test_cold_split_removes_every_interaction_of_the_held_out_items() -> None:
    frame, cold = bench.cold_split(FULL, 0.5, seed=3)
    assert len(cold) == 3 and len(set(cold)) == 3
    assert not frame["item_id"].isin(cold).any()
    kept = [i for i in FULL.item_ids[FULL.item_idx] if i not in cold]
    assert frame["item_id"].tolist() == kept, "every interaction with a warm item stays, in file order"
    assert bench.cold_split(FULL, 0.5, seed=3)[1] == cold


def test_cold_metrics_by_hand(monkeypatch) -> None:
    monkeypatch.setattr(bench, "K", 1)
    monkeypatch.setattr(bench, "FULL_K", 1)
    warm = _log([("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "c"), ("u2", "d")])
    p = bench.ColdProtocol(FULL, warm, ["e", "f"], seed=0)
    col = {item: j for j, item in enumerate(p.item_ids)}
    assert p.item_ids[p.num_warm:] == ["e", "f"] and list(p.users) == [0, 1]
    scores = np.zeros((2, 6))
    for item, v in {"a": 1.0, "b": 1.0, "c": 0.1, "d": 0.2, "e": 0.5, "f": 0.9}.items():
        scores[0, col[item]] = v  # u1: cold positive e beaten by cold f (cold rank 1, all rank 1)
    for item, v in {"a": 1.0, "b": 0.9, "c": 1.0, "d": 1.0, "e": 0.8, "f": 0.95}.items():
        scores[1, col[item]] = v  # u2: cold positive f above e and above unseen b (rank 0 both)
    m = p.metrics(scores)
    assert m["cold-hr@10"] == 0.5 and m["cold-ndcg@10"] == 0.5 and m["cold-hr@10-all"] == 0.5
    # top-1 of untrained items: u1 -> f (not its positive), u2 -> f (its positive)
    assert m["cold-recall@20"] == 0.5
    scores[1, col["e"]] = 0.95  # a tie counts against the positive
    assert p.metrics(scores)["cold-hr@10"] == 0.0
