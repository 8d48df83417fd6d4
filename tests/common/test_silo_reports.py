"""Pooling the evaluation sums silos keep for themselves (simulation only)."""

from __future__ import annotations

import json
import math

import pytest

from common.silo_reports import pooled_evaluation, read_report


def _write(root, pid, lines):
    path = root / f"silo-{pid}" / "uid" / "silo-report.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_pooled_evaluation_adds_sums_before_dividing(tmp_path):
    _write(tmp_path, 0, [
        {"round": 1, "kind": "training", "loss": 3.0, "seconds": 1.0},
        {"round": 1, "kind": "evaluation", "val-users": 10, "val-hits@10": 5, "val-ndcg@10": 2.0,
         "test-users": 10, "test-hits@10": 4, "test-ndcg@10": 1.0, "test-full-recall@20": 2},
    ])
    _write(tmp_path, 1, [
        {"round": 1, "kind": "evaluation", "val-users": 30, "val-hits@10": 3, "val-ndcg@10": 2.0,
         "test-users": 30, "test-hits@10": 0, "test-ndcg@10": 1.0, "test-full-recall@20": 6},
    ])
    pooled = pooled_evaluation(tmp_path, 10)
    assert list(pooled) == [1]
    m = pooled[1]
    assert m["silos"] == 2
    assert m["val-hr@10"] == pytest.approx(8 / 40) and m["val-ndcg@10"] == pytest.approx(4 / 40)
    assert m["test-hr@10"] == pytest.approx(4 / 40) and m["test-full-recall@20"] == pytest.approx(8 / 40)


def test_no_users_gives_nan_and_a_bad_line_is_named(tmp_path):
    _write(tmp_path, 0, [{"round": 2, "kind": "evaluation", "val-users": 0, "val-hits@10": 0,
                          "test-users": 0, "test-hits@10": 0}])
    assert math.isnan(pooled_evaluation(tmp_path, 10)[2]["val-hr@10"])
    bad = _write(tmp_path, 1, [])
    bad.write_text('{"round": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"silo-report.jsonl:2: not a JSON line"):
        read_report(bad)
