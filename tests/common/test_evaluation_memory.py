"""Full ranking in bounded memory: blocked scoring gives exactly the unblocked sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.eval_memory import synthetic_split
from common.data.split import UserSplit
from common.evaluation import EvalProtocol, activation_bytes, evaluation_sums, score_users
from common.models import build_model

USERS, ITEMS = 40, 300


def _sums(name: str, **protocol: float) -> dict:
    torch.manual_seed(0)
    split = synthetic_split(USERS, ITEMS, seed=3)
    model = build_model(name, USERS, ITEMS, 8, (16, 8))  # type: ignore[arg-type]
    popularity = np.bincount(split.train_item, minlength=ITEMS).astype(np.float64)
    return evaluation_sums(model, split, EvalProtocol(**protocol), popularity, torch.device("cpu"))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["mf", "neumf"])
def test_blocked_full_ranking_equals_unblocked_exactly(name: str) -> None:
    # Arrange: one block of every user and item (the unbounded computation) vs a
    # budget so small that blocks hold one user and NeuMF chunks a few items.
    unbounded = _sums(name, memory_mb=10_000.0)
    # Act
    blocked = _sums(name, memory_mb=0.01)
    # Assert: identical sums, key by key (no tolerance)
    assert blocked == unbounded
    assert unbounded["test-users"] == USERS and "test-full-recall@20" in unbounded


def test_neumf_is_scored_in_item_chunks_within_the_budget(monkeypatch) -> None:
    model = build_model("neumf", USERS, ITEMS, 8, (16, 8))
    users = torch.arange(4)
    calls: list[tuple[int, ...]] = []
    forward = type(model).forward

    def counting(self, u, i):  # noqa: ANN001, ANN202
        calls.append(tuple(i.shape))
        return forward(self, u, i)

    monkeypatch.setattr(type(model), "forward", counting)
    budget = 4 * 50 * activation_bytes(model)  # 50 items per chunk for 4 users
    with torch.no_grad():
        chunked = score_users(model, users, budget)
    assert calls[0] == (4, 50) and len(calls) == 6  # 300 items / 50
    monkeypatch.setattr(type(model), "forward", forward)
    with torch.no_grad():
        torch.testing.assert_close(chunked, model.score_all(users), rtol=0, atol=0)


def test_val_users_samples_a_fixed_subset_and_test_keeps_everyone() -> None:
    every = _sums("mf")
    subset = _sums("mf", val_users=7)
    assert subset["val-users"] == 7 and every["val-users"] == USERS
    assert subset["test-users"] == USERS and subset["test-hits@10"] == every["test-hits@10"]
    assert _sums("mf", val_users=7) == subset  # the same subset every time


def test_bad_budget_or_val_users_is_refused() -> None:
    with pytest.raises(ValueError, match="eval.memory-mb"):
        EvalProtocol(memory_mb=0)
    with pytest.raises(ValueError, match="eval.val-users"):
        EvalProtocol(val_users=-1)


def test_full_ranking_leaves_out_the_validation_item() -> None:
    # Arrange: one user, 6 items scored 0..5 by hand (dim 1, user row 1, item row i). Train
    # item 5 (the best), validation item 4 (the next), test item 1. Candidates for the test item
    # are the items neither trained on nor the validation item: {0, 1, 2, 3}; items 3 and 2
    # score above item 1, so its 0-based rank is 2.
    split = UserSplit(
        num_items=6,
        train_user=np.array([0], dtype=np.int64),
        train_item=np.array([5], dtype=np.int64),
        val_item=np.array([4], dtype=np.int64),
        test_item=np.array([1], dtype=np.int64),
        val_negatives=np.array([[0]], dtype=np.int64),
        test_negatives=np.array([[0]], dtype=np.int64),
        user_global_idx=np.array([0], dtype=np.int64),
    )
    model = build_model("mf", 1, 6, 1, (4,))  # type: ignore[arg-type]
    with torch.no_grad():
        model.user_embedding.weight.fill_(1.0)
        model.item_embedding.weight.copy_(torch.arange(6.0)[:, None])
    # Act
    sums = evaluation_sums(model, split, EvalProtocol(k=3, full_ranking_k=2), np.ones(6), torch.device("cpu"))  # type: ignore[arg-type]
    # Assert: rank 2 is a hit at K = 3 (DCG 1/log2(4) = 0.5) and a miss at K = 2; with the
    # validation item among the candidates the rank would be 3, a miss at K = 3 too.
    assert sums["test-full-recall@3"] == 1.0 and sums["test-full-ndcg@3"] == pytest.approx(0.5)
    assert sums["test-full-recall@2"] == 0.0
    # the top-3 list (exposure) skips the trained item 5 and the validation item 4
    assert sums["exposure"] == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
