"""Distributed DP with personalize.method = "recency": each silo keeps its shifted copy's sums; none reach the server."""

import json

import pytest

from client.app import app as client_app
from common.config import AppConfig
from common.errors import ConfigError
from common.evaluation import PERSONALIZED
from common.silo_reports import pooled_evaluation, read_report, report_files
from server.federation import run_federation
from tests.fakes import LocalGrid
from tests.server.test_distributed_round import SILOS, distributed_config


def test_each_silo_keeps_its_recency_copys_sums_and_the_server_gets_none_of_them(tmp_path):
    run_dir = tmp_path / "run"
    cfg = distributed_config(run_dir, **{"personalize.enabled": True, "personalize.method": "recency"})
    sent: list[str] = []

    def spy(reply):  # every key of every reply's metrics and configs
        if reply.has_content():
            for records in (reply.content.metric_records, reply.content.config_records):
                sent.extend(key for record in records.values() for key in record)

    run_federation(LocalGrid(client_app, cfg, SILOS, on_reply=spy), cfg)
    lines = [line for path in report_files(run_dir / "state") for line in read_report(path)
             if line.get("kind") == "evaluation"]  # fmt: skip
    assert len(lines) == SILOS
    for line in lines:
        assert 0 <= line[f"{PERSONALIZED}test-hits@10"] <= line[f"{PERSONALIZED}test-users"] == line["test-users"]
    pooled = pooled_evaluation(run_dir / "state", 10)[2]
    assert 0.0 <= pooled[f"{PERSONALIZED}test-hr@10"] <= 1.0
    assert sent and not any(key.startswith(PERSONALIZED) for key in sent)
    server_metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any(key.startswith(PERSONALIZED) for r in server_metrics for key in r["evaluate"])
    assert len(list((run_dir / "state").rglob("personalized.npz"))) == SILOS


@pytest.mark.parametrize("method", ["fine-tune", "ditto"])
def test_distributed_dp_refuses_the_personalization_methods_that_train(tmp_path, method):
    cfg = distributed_config(tmp_path, **{"personalize.enabled": True, "personalize.method": method})
    with pytest.raises(ConfigError, match=f"personalize.method '{method}' is not supported; use \"recency\""):
        AppConfig.from_run_config(cfg)
