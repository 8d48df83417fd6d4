"""The popularity ranking's sums on the model's own candidates (the floor beside the model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.split import UserSplit
from common.evaluation import EvalProtocol, evaluation_sums, summarize, sums_problem
from common.models import build_model


def test_popularity_sums_rank_each_held_out_item_by_training_counts():
    split = UserSplit(
        num_items=5,
        train_user=np.array([0, 1], dtype=np.int64),
        train_item=np.array([3, 2], dtype=np.int64),
        val_item=np.array([1, 4], dtype=np.int64),
        test_item=np.array([0, 4], dtype=np.int64),
        val_negatives=np.array([[2, 4], [1, 0]], dtype=np.int64),
        test_negatives=np.array([[1, 2], [0, 1]], dtype=np.int64),
        user_global_idx=np.arange(2, dtype=np.int64),
    )
    popularity = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    protocol = EvalProtocol(k=1, full_ranking=False)
    torch.manual_seed(0)
    model = build_model("mf", 2, 5, 4, (8,))
    sums = evaluation_sums(model, split, protocol, popularity, torch.device("cpu"))
    # test: user 0's item 0 is the most popular of {0, 1, 2} (rank 0: a hit at K = 1, DCG 1);
    # user 1's item 4 is the least popular of {4, 0, 1} (rank 2: no hit).
    assert sums["popularity-test-hits@1"] == 1.0 and sums["popularity-test-ndcg@1"] == pytest.approx(1.0)
    # val: user 0's item 1 beats 2 and 4 (hit); user 1's item 4 loses to 1 and 0.
    assert sums["popularity-val-hits@1"] == 1.0
    assert sums_problem(sums, protocol, 5) is None
    metrics = summarize(sums, 1)
    assert metrics["popularity-test-hr@1"] == 0.5 and metrics["popularity-val-hr@1"] == 0.5
