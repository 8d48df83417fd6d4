"""Hostile and faulty training replies: each is rejected with its reason or bounded, never raised."""

import dataclasses

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from common import records
from server.strategy import SharedModelFedAvg
from tests.fakes import STRATEGY_SETTINGS, FourNodeGrid, train_reply

NAME = "item_embedding.weight"
BIAS = "item_bias.weight"


def _round(settings=STRATEGY_SETTINGS, registry=None):
    strategy = SharedModelFedAvg(settings, k=10, registry=registry)
    current = ArrayRecord(
        {NAME: Array(np.zeros((3, 2), dtype=np.float32)), BIAS: Array(np.zeros((3, 1), dtype=np.float32))}
    )
    instructions = list(strategy.configure_train(1, current, ConfigRecord(), FourNodeGrid()))
    return strategy, instructions


def _arrays(value: float, bias: float = 0.0) -> dict[str, np.ndarray]:
    return {NAME: np.full((3, 2), value, dtype=np.float32), BIAS: np.full((3, 1), bias, dtype=np.float32)}


def _with_metrics(reply, **changes):
    metrics = dict(reply.content.metric_records[records.METRICS])
    for key, value in changes.items():
        if value is None:
            metrics.pop(key, None)
        else:
            metrics[key] = value
    reply.content[records.METRICS] = MetricRecord(metrics)
    return reply


def _honest(instructions, n=3):
    return [train_reply(instructions[i], _arrays(1.0), 10.0) for i in range(n)]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({records.NUM_EXAMPLES: float("inf")}, "'num-examples' must be a finite number"),
        ({records.NUM_EXAMPLES: -5.0}, "must be positive"),
        ({records.TRAIN_SECONDS: float("nan")}, "'train-seconds' must be a finite number"),
        ({records.TRAIN_LOSS: [1.0, 2.0]}, "'train-loss' must be a number"),
        ({records.TRAIN_SECONDS: -1.0}, "'train-seconds' must be >= 0"),
        ({records.PARTITION_ID: -1}, "'partition-id' must be a non-negative integer"),
    ],
)
def test_a_malformed_metrics_record_is_rejected_and_the_round_goes_on(changes, reason):
    # Arrange
    strategy, instructions = _round()
    bad = _with_metrics(train_reply(instructions[3], _arrays(1.0), 10.0), **changes)
    # Act
    arrays, metrics = strategy.aggregate_train(1, [*_honest(instructions), bad])
    # Assert: the three honest silos are averaged; the bad one is named with its reason.
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays[NAME].numpy(), 1.0)
    (rejected,) = strategy.take_events().rejected
    assert rejected[0] == instructions[3].metadata.dst_node_id and reason in rejected[1]


def test_a_reply_without_loss_and_seconds_is_used_and_the_round_reports_neither():
    """Under DP silos keep their loss and seconds (common.privacy.release): not an error."""
    strategy, instructions = _round()
    replies = [_with_metrics(r, **{records.TRAIN_LOSS: None, records.TRAIN_SECONDS: None}) for r in _honest(instructions, 4)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.take_events().rejected == []
    assert dict(metrics) == {records.NUM_EXAMPLES: 40, records.TRAIN_SILOS: 4}


CLIP = dataclasses.replace(STRATEGY_SETTINGS, norm_action="clip")


def test_an_inflated_weight_is_capped_at_the_registered_weight():
    # Arrange: silo 3 claims 1e9 examples; every silo registered 10.
    strategy, instructions = _round(CLIP, registry=lambda nodes: dict.fromkeys(range(nodes), 10))
    replies = [_with_metrics(r, **{records.PARTITION_ID: i}) for i, r in enumerate(_honest(instructions))]
    attacker = _with_metrics(train_reply(instructions[3], _arrays(5.0), 1e9), **{records.PARTITION_ID: 3})
    # Act
    arrays, _ = strategy.aggregate_train(1, [*replies, attacker])
    # Assert: weight 10 each, not 1e9. The attacker's norm 5 x sqrt(6) = 12.25 is also above the
    # bound 3 x sqrt(6) = 7.35, so its entries become 3.0: the mean is (1 + 1 + 1 + 3) / 4 = 1.5.
    events = strategy.take_events()
    (stats,) = [s for s in events.silos if s.partition_id == 3]
    assert stats.weight_claimed == 1e9 and stats.weight_used == 10
    assert arrays is not None
    np.testing.assert_allclose(arrays[NAME].numpy(), 1.5, rtol=1e-5)


def test_an_update_of_norm_1e30_is_rejected_by_default():
    # Arrange
    strategy, instructions = _round()
    huge = train_reply(instructions[3], _arrays(1e30), 10.0)
    # Act
    arrays, _ = strategy.aggregate_train(1, [*_honest(instructions), huge])
    # Assert: norm sqrt(6) x 1e30 is far above the bound 3 x sqrt(6): rejected, the rest averaged.
    (rejected,) = strategy.take_events().rejected
    assert rejected[0] == instructions[3].metadata.dst_node_id
    assert "update norm 2.449e+30 exceeds the bound 7.348" in rejected[1]
    assert arrays is not None
    np.testing.assert_allclose(arrays[NAME].numpy(), 1.0)


def test_an_update_of_norm_1e30_is_clipped_and_flagged_with_norm_action_clip():
    # Arrange
    strategy, instructions = _round(CLIP)
    huge = train_reply(instructions[3], _arrays(1e30), 10.0)
    # Act
    arrays, _ = strategy.aggregate_train(1, [*_honest(instructions), huge])
    # Assert: honest norms are sqrt(6) = 2.449 (six ones); the bound is 3 x median = 7.348. The
    # clipped update has each of its six entries 7.348 / sqrt(6) = 3.0: the mean is (3 + 3) / 4.
    events = strategy.take_events()
    bad = next(s for s in events.silos if s.node == instructions[3].metadata.dst_node_id)
    assert bad.clipped and bad.outlier and bad.norm == pytest.approx(1e30 * 6**0.5, rel=1e-6)
    assert arrays is not None and np.isfinite(arrays[NAME].numpy()).all()
    assert arrays[NAME].numpy().max() == pytest.approx((3 * 1.0 + 3.0) / 4, rel=1e-5)


def test_float32_max_values_never_overflow_the_aggregate():
    # Arrange: two replies at float32 max in every coordinate, no norm bound.
    settings = dataclasses.replace(STRATEGY_SETTINGS, norm_action="none")
    strategy, instructions = _round(settings)
    top = np.finfo(np.float32).max
    replies = [train_reply(instructions[i], _arrays(top, top), 1e30) for i in range(2)]
    # Act
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: computed in float64 the mean stays float32 max; nothing became inf.
    assert arrays is not None
    assert np.isfinite(arrays[NAME].numpy()).all() and np.isfinite(arrays[BIAS].numpy()).all()


def test_two_replies_claiming_one_partition_keep_only_the_first():
    # Arrange
    strategy, instructions = _round()
    a = _with_metrics(train_reply(instructions[0], _arrays(1.0), 10.0), **{records.PARTITION_ID: 0})
    b = _with_metrics(train_reply(instructions[1], _arrays(2.0), 10.0), **{records.PARTITION_ID: 0})
    # Act
    arrays, _ = strategy.aggregate_train(1, [a, b])
    # Assert
    assert arrays is not None and arrays[NAME].numpy().max() == pytest.approx(1.0)
    (rejected,) = strategy.take_events().rejected
    assert "claims partition 0, which another reply of this round already claimed" in rejected[1]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"owner": "silo-0"}, "privacy record invalid"),
        ({"kind": "dp-sgd"}, "privacy record invalid: owner: missing"),
    ],
)
def test_a_privacy_record_that_does_not_parse_is_rejected(record, reason):
    # Arrange
    strategy, instructions = _round()
    bad = train_reply(instructions[3], _arrays(1.0), 10.0)
    bad.content[records.PRIVACY] = ConfigRecord(record)
    # Act
    strategy.aggregate_train(1, [*_honest(instructions), bad])
    # Assert
    (rejected,) = strategy.take_events().rejected
    assert reason in rejected[1]


def test_a_sign_flipped_update_points_against_the_aggregate_and_is_flagged():
    # Arrange
    strategy, instructions = _round()
    flipped = train_reply(instructions[3], _arrays(-1.0), 10.0)
    # Act
    strategy.aggregate_train(1, [*_honest(instructions), flipped])
    # Assert: the aggregate is (3 - 1) / 4 = 0.5 per coordinate: cosine -1 for the flipped silo.
    events = strategy.take_events()
    bad = next(s for s in events.silos if s.node == instructions[3].metadata.dst_node_id)
    assert bad.cosine == pytest.approx(-1.0) and bad.outlier
    assert all(not s.outlier for s in events.silos if s is not bad)


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean", "krum"])
def test_robust_aggregators_ignore_one_outlier(aggregator):
    # Arrange: 5 silos; one sends 100 in every coordinate (no norm bound, to see the aggregator alone).
    settings = dataclasses.replace(STRATEGY_SETTINGS, aggregator=aggregator, norm_action="none", krum_malicious=1)
    strategy = SharedModelFedAvg(settings, k=10)
    current = ArrayRecord({NAME: Array(np.zeros((3, 2), dtype=np.float32))})

    class FiveNodes:
        def get_node_ids(self):
            return [1, 2, 3, 4, 5]

    instructions = list(strategy.configure_train(1, current, ConfigRecord(), FiveNodes()))
    values = [1.0, 1.1, 0.9, 1.0, 100.0]
    replies = [
        train_reply(m, {NAME: np.full((3, 2), v, dtype=np.float32)}, 10.0)
        for m, v in zip(instructions, values, strict=True)
    ]
    # Act
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: median of (0.9, 1, 1, 1.1, 100) = 1; trimmed (beta 0.2 drops 0.9 and 100) = 1.0333;
    # multi-Krum keeps the 4 closest = mean(1, 1.1, 0.9, 1) = 1.0.
    expected = {"median": 1.0, "trimmed-mean": (1.0 + 1.1 + 1.0) / 3, "krum": 1.0}[aggregator]
    assert arrays is not None
    np.testing.assert_allclose(arrays[NAME].numpy(), expected, rtol=1e-5)


def test_an_update_opposed_to_the_others_is_rejected_but_never_the_majority():
    # Arrange: three silos push +1, one pushes -1 (cosine with the mean of the others = -1).
    strategy, instructions = _round()
    flipped = train_reply(instructions[3], _arrays(-1.0), 10.0)
    # Act
    arrays, _ = strategy.aggregate_train(1, [*_honest(instructions), flipped])
    # Assert: the flipped update is rejected; the aggregate is the honest mean 1.
    (rejected,) = strategy.take_events().rejected
    assert rejected[0] == instructions[3].metadata.dst_node_id
    assert "points against the other silos' (cosine -1.000 < 0)" in rejected[1]
    assert arrays is not None
    np.testing.assert_allclose(arrays[NAME].numpy(), 1.0)


def test_opposed_halves_reject_at_most_a_minority():
    # Arrange: two silos push +1 and two push -1: every update is opposed to the others' mean
    # (for +1: others mean (1 - 2) / 3 = -1/3, cosine -1). At most (4 - 1) // 2 = 1 is rejected.
    strategy, instructions = _round()
    replies = [train_reply(m, _arrays(v), 10.0) for m, v in zip(instructions, (1.0, 1.0, -1.0, -1.0), strict=True)]
    # Act
    strategy.aggregate_train(1, replies)
    # Assert
    assert len(strategy.take_events().rejected) == 1
