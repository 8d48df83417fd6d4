"""Distributed DP: the silos rank by the released DP histogram beside the model; the report shows it."""

import json

import numpy as np
import pytest

from client.app import app as client_app
from common import records
from common.data.split import UserSplit
from common.evaluation import DP_POPULARITY, EvalProtocol, ranking_sums
from common.privacy import distributed as dd
from common.rundir import RunDir
from common.silo_reports import pooled_evaluation, read_report, report_files
from server.distributed import popularity_biases
from server.federation import run_federation
from server.report import SILO_EVALUATION, append_silo_evaluation
from tests.fakes import LocalGrid
from tests.server.test_distributed_round import SILOS, distributed_config, server_ledger


def tiny_split():
    return UserSplit(
        num_items=5,
        train_user=np.array([0, 1, 2], dtype=np.int64),
        train_item=np.array([0, 1, 4], dtype=np.int64),
        val_item=np.array([1, 3, 2], dtype=np.int64),
        test_item=np.array([4, 0, 3], dtype=np.int64),
        val_negatives=np.array([[2, 3], [0, 4], [3, 4]], dtype=np.int64),
        test_negatives=np.array([[0, 2], [1, 2], [2, 4]], dtype=np.int64),
        user_global_idx=np.arange(3, dtype=np.int64),
    )


def test_ranking_sums_by_hand_ties_count_against():
    scores = np.array([5.0, 4.0, 3.0, 3.0, 1.0])  # items 2 and 3 tie
    # ranks: val u0 0, u1 1, u2 1 (tie with item 3); test u0 2, u1 0, u2 1 (tie with item 2)
    top1 = ranking_sums(scores, tiny_split(), EvalProtocol(k=1, full_ranking=False), "p-")
    assert top1 == {"p-val-hits@1": 1.0, "p-val-ndcg@1": 1.0, "p-test-hits@1": 1.0, "p-test-ndcg@1": 1.0}
    top2 = ranking_sums(scores, tiny_split(), EvalProtocol(k=2, full_ranking=False), "p-")
    assert top2["p-val-hits@2"] == 3.0 and top2["p-test-hits@2"] == 2.0
    assert top2["p-val-ndcg@2"] == pytest.approx(1.0 + 2.0 / np.log2(3.0))
    with pytest.raises(ValueError, match="4 item scores for 5 items"):
        ranking_sums(scores[:4], tiny_split(), EvalProtocol(k=1, full_ranking=False), "p-")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("distributed-popularity") / "run"
    sent: list[dict] = []

    def spy(node, message):  # never drops: records what the server sends for evaluation
        if message.metadata.message_type == "evaluate":
            sent.append(dict(message.content.config_records[records.CONFIG]))
        return False

    cfg = distributed_config(run_dir, **{"privacy.distributed.freeze-biases": True})
    run_federation(LocalGrid(client_app, cfg, SILOS, drop=spy), cfg)
    return run_dir, sent, cfg


def test_the_silos_get_the_released_histogram_and_keep_its_sums_beside_the_models(run):
    run_dir, sent, cfg = run
    histograms = [np.array(c[dd.RELEASED_POPULARITY]) for c in sent]
    assert histograms and all(np.array_equal(h, histograms[0]) for h in histograms)
    final = np.load(run_dir / "final.npz")["item_bias.weight"].ravel()
    # the anchor is exactly the released histogram's transform, and frozen biases stay there
    np.testing.assert_allclose(final, popularity_biases(histograms[0]), rtol=1e-6, atol=1e-6)
    lines = [line for path in report_files(run_dir / "state") for line in read_report(path)
             if line.get("kind") == "evaluation"]  # fmt: skip
    assert len(lines) == SILOS
    for line in lines:
        assert {f"{DP_POPULARITY}val-hits@10", f"{DP_POPULARITY}test-hits@10", "val-hits@10"} <= set(line)
        assert 0 <= line[f"{DP_POPULARITY}test-hits@10"] <= line["test-users"]
    pooled = pooled_evaluation(run_dir / "state", 10)[2]
    hits = sum(line[f"{DP_POPULARITY}test-hits@10"] for line in lines)
    assert pooled[f"{DP_POPULARITY}test-hr@10"] == pytest.approx(hits / sum(line["test-users"] for line in lines))


def test_the_report_names_the_dp_popularity_baseline_and_a_simulation_adds_the_pooled_table(run):
    run_dir, _, _ = run
    histogram = next(e for e in server_ledger(run_dir) if e["kind"] == dd.KIND_HISTOGRAM)
    report = (run_dir / "report.md").read_text()
    assert "**DP popularity baseline:**" in report and f"ε = {histogram['epsilon']:.4f}" in report
    pooled = pooled_evaluation(run_dir / "state", 10)
    assert append_silo_evaluation(RunDir(run_dir), pooled, 10)
    assert append_silo_evaluation(RunDir(run_dir), pooled, 10)  # once: a second call replaces the section
    text = (run_dir / "report.md").read_text()
    assert text.count(SILO_EVALUATION) == 1
    row = next(line for line in text.splitlines() if line.startswith("| 2*"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{pooled[2]['val-hr@10']:.4f}" and cells[5] == f"{pooled[2][f'{DP_POPULARITY}test-hr@10']:.4f}"
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["evaluate"].get("val-hr@10") is None
