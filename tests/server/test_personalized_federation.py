"""Personalization in a federated run: nothing personalized travels, the shared model is untouched, sums pool."""

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from common import records
from common.evaluation import PERSONALIZED, EvalProtocol, sum_shapes, summarize, sums_problem
from common.storage import load_arrays
from tests.fakes import run_local


def _run(config: dict, tmp_path: Path, name: str, personalize: bool) -> tuple[list[Message], object, Path]:
    run_config = dict(config)
    run_config.update({"num-server-rounds": 2, "run-dir": str(tmp_path / name), "personalize.enabled": personalize})
    run_config.update({"data.skew": "dirichlet", "data.dirichlet-alpha": 0.1, "personalize.lr": 0.01})
    replies: list[Message] = []
    grid = run_local(run_config, num_nodes=2, on_reply=replies.append)
    return replies, grid, Path(run_config["run-dir"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.conftest import small_run_config

    tmp = tmp_path_factory.mktemp("personalized")
    config = small_run_config.__wrapped__(tmp)  # the fixture's function
    return {on: _run(config, tmp, f"on-{on}", on) for on in (False, True)}


def _by_type(replies: list[Message], kind: str) -> list[Message]:
    """Replies of one kind, ordered by node, then by round (the order each node sent them)."""
    chosen = [r for r in replies if r.metadata.message_type == kind]
    return sorted(chosen, key=lambda r: r.metadata.src_node_id)  # stable: rounds stay in order


def test_train_replies_carry_the_same_shared_arrays_with_and_without_personalization(runs):
    # Arrange
    off, on = _by_type(runs[False][0], "train"), _by_type(runs[True][0], "train")
    # Assert: same replies, bit for bit; the shared part never sees the fine-tune.
    assert len(off) == len(on) == 4
    for a, b in zip(off, on, strict=True):
        assert set(a.content.array_records) == set(b.content.array_records) == {records.ARRAYS}
        arrays_a, arrays_b = a.content.array_records[records.ARRAYS], b.content.array_records[records.ARRAYS]
        assert set(arrays_a) == set(arrays_b)
        for name in arrays_a:
            assert np.array_equal(arrays_a[name].numpy(), arrays_b[name].numpy()), name
    final_off = load_arrays(runs[False][2] / "final.npz")
    final_on = load_arrays(runs[True][2] / "final.npz")
    assert all(np.array_equal(final_off[n].numpy(), final_on[n].numpy()) for n in final_off)


def test_no_personalized_parameter_travels(runs):
    # Arrange
    replies, grid, _ = runs[True]
    # Assert: each silo holds a personalized copy whose item rows differ from every array it sent.
    for node, ctx in grid.contexts.items():
        personal = ctx.state.array_records[records.STATE_PERSONALIZED]
        sent = [r for r in replies if r.metadata.src_node_id == node]
        assert sent
        item_rows = personal["item_embedding.weight"].numpy()
        final = load_arrays(runs[True][2] / "final.npz")["item_embedding.weight"].numpy()
        assert not np.array_equal(item_rows, final), "the fine-tune kept epoch 0 in this silo: test cannot fail"
        for reply in sent:
            assert set(reply.content.config_records) == set()
            assert set(reply.content.array_records) <= {records.ARRAYS}
            for rec in reply.content.array_records.values():
                for arr in rec.values():
                    values = arr.numpy()
                    assert not (values.shape == item_rows.shape and np.allclose(values, item_rows))
            for key, value in reply.content.metric_records[records.METRICS].items():
                assert not isinstance(value, list) or len(value) != item_rows.size, key


def test_evaluation_replies_without_personalization_hold_exactly_the_old_sums(runs):
    # Arrange
    off, on = _by_type(runs[False][0], "evaluate"), _by_type(runs[True][0], "evaluate")
    protocol = EvalProtocol(k=10, full_ranking_k=20)
    # Assert
    assert len(off) == len(on) == 4
    for a, b in zip(off, on, strict=True):
        sums_a = dict(a.content.metric_records[records.METRICS])
        sums_b = dict(b.content.metric_records[records.METRICS])
        assert set(sums_a) - {records.NUM_EXAMPLES} == set(sum_shapes(protocol, 300))
        assert set(sums_b) - set(sums_a) == {PERSONALIZED + k for k in sum_shapes(protocol, 300)}
        assert {k: v for k, v in sums_b.items() if k in sums_a} == sums_a  # global sums unchanged


def test_run_metrics_report_global_and_personalized_hit_rates(runs):
    # Arrange
    rounds_off = [json.loads(x) for x in (runs[False][2] / "metrics.jsonl").read_text().splitlines()]
    rounds_on = [json.loads(x) for x in (runs[True][2] / "metrics.jsonl").read_text().splitlines()]
    # Assert
    for off, on in zip(rounds_off, rounds_on, strict=True):
        assert not any(k.startswith(PERSONALIZED) for k in off["evaluate"])
        assert on["evaluate"]["test-hr@10"] == off["evaluate"]["test-hr@10"]
        assert 0.0 <= on["evaluate"]["personalized-test-hr@10"] <= 1.0
        assert on["rejected"] == []


def test_server_checks_and_pools_personalized_sums_like_the_global_ones():
    # Arrange: one silo, 4 users: 3 hits on validation, 1 on test; personalized 4 and 2.
    protocol = EvalProtocol(k=10, full_ranking=False, personalized=True)
    plain = EvalProtocol(k=10, full_ranking=False)
    base = {key: 0.0 if length is None else [0.0] * length for key, length in sum_shapes(plain, 300).items()}
    base.update({"val-users": 4.0, "val-hits@10": 3.0, "val-ndcg@10": 1.5, "test-users": 4.0, "test-hits@10": 1.0,
                 "test-ndcg@10": 0.5, "activity-users": [0.0] * 5 + [4.0] + [0.0] * 995,
                 "activity-hits": [0.0] * 5 + [1.0] + [0.0] * 995})
    personal = {**base, "val-hits@10": 4.0, "test-hits@10": 2.0}
    sums = {**base, **{PERSONALIZED + k: v for k, v in personal.items()}}
    # Act
    metrics = summarize(sums, 10)
    # Assert
    assert sums_problem(sums, protocol, 300) is None
    assert sums_problem(base, protocol, 300) is not None  # personalized sums missing: refused
    assert sums_problem(sums, plain, 300) is not None  # not asked for: refused
    too_many = {**sums, PERSONALIZED + "test-hits@10": 5.0}
    assert "exceeds the 4 users" in str(sums_problem(too_many, protocol, 300))
    assert metrics["val-hr@10"] == 0.75 and metrics["test-hr@10"] == 0.25
    assert metrics["personalized-val-hr@10"] == 1.0 and metrics["personalized-test-hr@10"] == 0.5
