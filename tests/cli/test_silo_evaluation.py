"""fedrec simulate under DP prints the evaluation the silos kept for themselves."""

from __future__ import annotations

import json

from cli.runs import print_silo_evaluation


def test_pooled_silo_evaluation_is_printed_with_its_provenance(tmp_path, capsys):
    for pid, hits in ((0, 3), (1, 5)):
        path = tmp_path / f"silo-{pid}" / "uid" / "silo-report.jsonl"
        path.parent.mkdir(parents=True)
        line = {"round": 4, "kind": "evaluation", "val-users": 10, "val-hits@10": hits, "val-ndcg@10": 1.0,
                "test-users": 10, "test-hits@10": hits + 1, "test-ndcg@10": 2.0}
        path.write_text(json.dumps(line) + "\n")
    print_silo_evaluation(tmp_path, 10)
    out = capsys.readouterr().out
    assert "kept in the silos" in out and "not sent to the server" in out
    assert "0.4000" in out and "0.5000" in out  # val HR 8/20, test HR 10/20


def test_nothing_is_printed_without_silo_reports(tmp_path, capsys):
    print_silo_evaluation(tmp_path, 10)
    assert capsys.readouterr().out == ""
