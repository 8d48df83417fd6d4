"""The release policy, end to end: every serialised reply and the run directory of a DP run.

Under a DP mode a silo may send only (a) the DP mechanism's output — the shared
arrays after DP-SGD, or noisy evaluation sums — with its privacy release and ledger
lines, (b) public facts: its partition id and roster size N. Under central DP the
run directory keeps no per-silo statistic and no count the server computed from the
silos' exact updates. Every release a silo sent is in its ledger, and the ledgers
replay (``fedrec audit``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Message

from common import records
from common.config import AppConfig
from common.data.pipeline import silo_data
from common.privacy.audit import audit_run
from common.privacy.events import DP_EVALUATION, DP_SGD, PrivacyRelease
from common.rundir import RunDir
from tests.fakes import local_dp_run_config, run_local

SILOS = 2
SHARED = {"item_embedding.weight", "item_bias.weight", "global_bias.value"}  # MF's shared parameters
TRAIN_KEYS = {records.NUM_EXAMPLES, records.PARTITION_ID}
WITHHELD_KEYS = {records.EVAL_WITHHELD, records.PARTITION_ID}
NOISY_KEYS = {
    "val-users", "val-hits@10", "val-ndcg@10", "test-users", "test-hits@10", "test-ndcg@10",
    records.EVAL_NOISY, records.PARTITION_ID,
}
MODES = {
    "local": {"privacy.mode": "local"},
    "local-noisy-eval": {"privacy.mode": "local", "privacy.release.evaluation": "noisy"},
    "central": {"privacy.mode": "central", "privacy.central.noise-multiplier": 1.0},
    "local+central": {"privacy.mode": "local+central", "privacy.central.noise-multiplier": 1.0},
}


def _run(tmp_path: Path, mode: str) -> tuple[dict, list[Message], Path]:
    run_dir = tmp_path / mode
    small = {"data.synthetic.num-users": 120, "data.synthetic.mean-interactions": 10, "strategy.min-nodes": SILOS}
    cfg = local_dp_run_config(run_dir, 2, **MODES[mode], **small)
    replies: list[Message] = []
    run_local(cfg, SILOS, on_reply=replies.append)
    return cfg, replies, run_dir


def _rosters(cfg: dict) -> dict[int, int]:
    app = AppConfig.from_run_config(cfg)
    return {pid: silo_data(app.data, app.seed, pid, SILOS).split.num_users for pid in range(SILOS)}


@pytest.mark.parametrize("mode", list(MODES))
def test_dp_replies_and_run_directory_hold_only_accounted_or_public_numbers(tmp_path, mode):
    cfg, replies, run_dir = _run(tmp_path, mode)
    rosters = _rosters(cfg)
    local = mode != "central"
    sent_releases: list[PrivacyRelease] = []
    kinds = {"train": 0, "withheld": 0, "noisy": 0}
    for msg in replies:
        assert not msg.has_error(), msg.error
        content = msg.content
        metrics = dict(content.metric_records[records.METRICS])
        pid = metrics[records.PARTITION_ID]
        if records.ARRAYS in content.array_records:  # a training reply
            kinds["train"] += 1
            assert set(content.array_records[records.ARRAYS].keys()) == SHARED
            assert set(metrics) == TRAIN_KEYS  # no loss, no seconds
            assert metrics[records.NUM_EXAMPLES] == rosters[pid]  # the public roster, not a data count
        elif records.EVAL_NOISY in metrics:
            kinds["noisy"] += 1
            assert set(metrics) == NOISY_KEYS
        else:
            kinds["withheld"] += 1
            assert set(metrics) == WITHHELD_KEYS
        assert set(content.array_records) <= {records.ARRAYS}
        assert set(content.config_records) <= ({records.PRIVACY, records.LEDGER} if local else set())
        if records.PRIVACY in content.config_records:
            release = PrivacyRelease.from_json(dict(content.config_records[records.PRIVACY]))
            assert release.population == rosters[pid]
            sent_releases.append(release)
    assert kinds["train"] == 2 * SILOS
    if mode == "local-noisy-eval":
        assert kinds == {"train": 4, "withheld": 0, "noisy": 4}
        assert sorted(r.kind for r in sent_releases) == [DP_EVALUATION] * 4 + [DP_SGD] * 4
    else:
        assert kinds["withheld"] == 2 * SILOS and kinds["noisy"] == 0

    rounds = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    assert len(rounds) == 2
    for r in rounds:
        if mode == "local-noisy-eval":
            assert set(r["evaluate"]) == {"val-hr@10", "val-ndcg@10", "test-hr@10", "test-ndcg@10", "silos"}
        else:
            assert r["evaluate"] == {records.EVAL_WITHHELD_SILOS: SILOS}
        if local and mode != "local+central":
            # Local DP: per-silo statistics are functions of DP outputs and public weights.
            assert set(r["train"]) == {records.NUM_EXAMPLES, records.TRAIN_SILOS}
            assert r["train"][records.NUM_EXAMPLES] == sum(rosters.values())
            assert {s["weight-claimed"] for s in r["silos"]} <= set(map(float, rosters.values()))
        else:
            assert r["train"] == {} and r["silos"] == [] and r["central-counts"] is None
            assert r["central-privacy"] is not None
        if local:
            assert len(r["privacy"]) == (2 * SILOS if mode == "local-noisy-eval" else SILOS)
    report = RunDir(run_dir).report.read_text()
    assert "loss" not in report.lower().split("## privacy")[0] or "withheld" in report.lower()
    # Every release a silo sent is a line of its ledger, and the ledgers replay.
    audit = audit_run(run_dir, empirical=False)
    assert audit.problems == [], audit.problems
    if local:
        in_ledgers = sum(len(led.trajectory) + len(led.declines) for led in audit.ledgers if led.owner != "server")
        assert in_ledgers == len(sent_releases)


def test_withheld_sums_stay_in_the_silos_own_report(tmp_path):
    _, _, run_dir = _run(tmp_path, "local")
    for pid in range(SILOS):
        (report,) = (run_dir / "silos" / f"silo-{pid}").glob("*/silo-report.jsonl")  # <state-root>/silo-K/<run uid>
        lines = [json.loads(x) for x in report.read_text().splitlines()]
        assert [x["kind"] for x in lines] == ["training", "evaluation"] * 2
        assert all("test-hits@10" in x for x in lines if x["kind"] == "evaluation")


def test_noisy_evaluation_is_refused_without_local_dp():
    from common.errors import ConfigError
    from common.run_config import load_default_run_config

    cfg = load_default_run_config()
    cfg.update({"privacy.mode": "central", "privacy.release.evaluation": "noisy"})
    with pytest.raises(ConfigError, match="privacy.release.evaluation: 'noisy' needs local DP"):
        AppConfig.from_run_config(cfg)
