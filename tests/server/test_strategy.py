"""SharedModelFedAvg: weighted averaging, rejection of malformed updates, summed evaluation."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common import records
from server.strategy import SharedModelFedAvg
from tests.fakes import STRATEGY_SETTINGS, FourNodeGrid, train_reply


def test_fedavg_is_example_weighted_and_malformed_updates_are_rejected():
    # Arrange
    strategy = SharedModelFedAvg(STRATEGY_SETTINGS, k=10)
    current = ArrayRecord({"item_embedding.weight": Array(np.zeros((3, 2), dtype=np.float32))})
    instructions = list(strategy.configure_train(1, current, ConfigRecord(), FourNodeGrid()))
    good_a = {"item_embedding.weight": np.ones((3, 2), dtype=np.float32)}
    good_b = {"item_embedding.weight": np.full((3, 2), 4.0, dtype=np.float32)}
    leaks_users = {**good_a, "user_embedding.weight": np.ones((5, 2), dtype=np.float32)}
    not_finite = {"item_embedding.weight": np.full((3, 2), np.nan, dtype=np.float32)}
    replies = [
        train_reply(instructions[0], good_a, 3.0),
        train_reply(instructions[1], good_b, 1.0),
        train_reply(instructions[2], leaks_users, 100.0),
        train_reply(instructions[3], not_finite, 100.0),
    ]
    # Act
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert: (3 * 1 + 1 * 4) / 4 = 1.75
    assert arrays is not None
    np.testing.assert_allclose(arrays["item_embedding.weight"].numpy(), 1.75)
    assert metrics[records.NUM_EXAMPLES] == 4
    reasons = dict(strategy.take_events().rejected)
    assert set(reasons) == {instructions[2].metadata.dst_node_id, instructions[3].metadata.dst_node_id}
    assert "user_embedding.weight" in reasons[instructions[2].metadata.dst_node_id]
    assert "NaN" in reasons[instructions[3].metadata.dst_node_id]


@pytest.mark.parametrize(
    ("arrays", "weight", "reason"),
    [
        ({"item_embedding.weight": np.ones((4, 2), dtype=np.float32)}, 1.0, "shape"),
        ({"item_embedding.weight": np.ones((3, 2), dtype=np.float64)}, 1.0, "dtype"),
        ({"item_embedding.weight": np.ones((3, 2), dtype=np.float32)}, 0.0, "positive"),
    ],
)
def test_each_malformed_update_is_rejected_with_its_reason(arrays, weight, reason):
    strategy = SharedModelFedAvg(STRATEGY_SETTINGS, k=10)
    current = ArrayRecord({"item_embedding.weight": Array(np.zeros((3, 2), dtype=np.float32))})
    instruction = next(iter(strategy.configure_train(1, current, ConfigRecord(), FourNodeGrid())))
    result, _ = strategy.aggregate_train(1, [train_reply(instruction, arrays, weight)])
    assert result is None
    assert reason in strategy.take_events().rejected[0][1]


def test_evaluation_sums_are_added_then_divided():
    # Arrange: silo A 2/4 hits, silo B 3/6 hits, so pooled HR = 5/10 (a mean of
    # per-silo rates weighted wrongly would differ).
    strategy = SharedModelFedAvg(STRATEGY_SETTINGS, k=10)

    def sums(users: int, hits: int) -> RecordDict:
        metrics = {
            records.NUM_EXAMPLES: int(users),
            "val-users": float(users), "val-hits@10": float(hits), "val-ndcg@10": hits / 2,
            "test-users": float(users), "test-hits@10": float(hits), "test-ndcg@10": hits / 2,
            "activity-users": [0.0, float(users)], "activity-hits": [0.0, float(hits)],
        }
        return RecordDict({records.METRICS: MetricRecord(metrics)})

    # Act
    out = strategy.evaluate_metrics_aggr_fn([sums(4, 2), sums(6, 3)], records.NUM_EXAMPLES)
    # Assert
    assert out["test-hr@10"] == pytest.approx(0.5)
    assert out["val-ndcg@10"] == pytest.approx(0.25)
    assert out["silos"] == 2
