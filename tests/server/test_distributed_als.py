"""``privacy.distributed.algorithm = "als"``: the server's item step, a whole run, its ledger and refusals."""

import json

import numpy as np
import pytest

from client.app import app as client_app
from common.errors import ConfigError
from common.privacy import distributed as dd
from common.privacy import dp_als
from common.privacy.audit import audit_run
from server.federation import run_federation
from tests.fakes import LocalGrid
from tests.server.test_distributed_anchor import POPULATION, model, settings, step, strategy
from tests.server.test_distributed_round import SILOS, distributed_config, server_ledger

ALS = {"privacy.distributed.algorithm": "als", "privacy.distributed.als-reg": 0.5,
       "privacy.distributed.als-unobserved-weight": 0.1}  # fmt: skip


def test_the_server_solves_the_item_rows_from_the_released_statistics_and_zeroes_the_biases():
    rng = np.random.default_rng(0)
    stats = np.abs(rng.normal(size=dp_als.statistics_length(3, 2)))  # 3 items, d = 2 (model()'s shape)
    s = strategy(settings(**ALS), [stats])
    out = step(s, 1, model())
    want = dp_als.item_rows(stats, 3, 2, POPULATION, s.mech.rate, 0.5, 0.1)
    np.testing.assert_allclose(out["item_embedding.weight"], want, rtol=1e-6)
    assert not out["item_bias.weight"].any() and not out["global_bias.value"].any()
    np.testing.assert_allclose(s.popularity, dp_als.released_counts(stats, 3, 2, s.mech.rate))  # the report's list


def test_the_mechanism_bounds_a_user_by_the_als_sensitivity():
    cfg = settings(**ALS, **{"privacy.distributed.als-max-items": 9, "privacy.distributed.als-row-clip": 2.0})
    mech = dd.mechanism(cfg.privacy.distributed, cfg.num_server_rounds, POPULATION, 2)
    assert mech.clip == pytest.approx(dp_als.sensitivity(9, 2.0))
    assert mech.share_std == pytest.approx(2.0 * dp_als.sensitivity(9, 2.0) / 1.0)  # σ·Δ/√(S − T), S = 2, T = 1


def test_als_refuses_what_belongs_to_fedavgs_step():
    with pytest.raises(ConfigError, match="top-items.*als"):
        settings(**ALS, **{"privacy.distributed.top-items": 5})
    with pytest.raises(ConfigError, match="item-step-kappa"):
        settings(**ALS, **{"privacy.distributed.item-step-kappa": 1.0})
    with pytest.raises(ConfigError, match="item-init-scale"):
        settings(**ALS, **{"privacy.distributed.item-init-scale": 0.0})
    with pytest.raises(ConfigError, match="algorithm"):
        settings(**{"privacy.distributed.algorithm": "sgd"})


@pytest.fixture(scope="module")
def als_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("als") / "run"
    cfg = distributed_config(run_dir, **ALS)
    run_federation(LocalGrid(client_app, cfg, SILOS), cfg)
    return run_dir


def test_an_als_run_releases_one_accounted_sum_per_round_with_delta_as_the_bound(als_run):
    releases = [e for e in server_ledger(als_run) if e["kind"].startswith("distributed")]
    assert [e["kind"] for e in releases] == [dd.KIND_HISTOGRAM, "distributed-dp-als", "distributed-dp-als"]
    bound = dp_als.sensitivity(40, 1.0)  # the defaults: k = 40, B = 1
    assert [e["clip"] for e in releases[1:]] == [pytest.approx(bound)] * 2
    assert all("DP-ALS" in e["released"] for e in releases[1:])
    assert not audit_run(als_run, empirical=False).problems  # the union ε replays from the ledger
    for path in sorted((als_run / "state").glob("silo-*/*/ledger.jsonl")):  # each silo's own view says the same
        own = [json.loads(x) for x in path.read_text().splitlines()]
        assert [e["released"] for e in own[1:]] == [e["released"] for e in releases[1:]]
        assert [e["kind"] for e in own] == [e["kind"] for e in releases]
        assert [e["clip"] for e in own[1:]] == [pytest.approx(bound)] * 2


def test_an_als_run_learns_item_rows_and_keeps_the_users_rows_in_their_silos(als_run):
    final = np.load(als_run / "final.npz")
    assert np.abs(final["item_embedding.weight"]).sum(axis=1).min() > 0  # every item's row was solved
    assert not final["item_bias.weight"].any()
    assert not any("user" in k for k in final.files)
    reports = sorted((als_run / "state").glob("silo-*/*/silo-report.jsonl"))
    assert len(reports) == SILOS
    lines = [json.loads(x) for x in reports[0].read_text().splitlines()]
    trained = [x for x in lines if x["kind"] == "training-als"]
    assert [x["round"] for x in trained] == [1, 2] and all(x["mean-row-norm"] > 0 for x in trained)


def test_without_a_histogram_the_silos_rank_by_the_als_rounds_released_counts(tmp_path):
    run_dir = tmp_path / "run"
    cfg = distributed_config(run_dir, **ALS, **{"privacy.distributed.popularity": False, "num-server-rounds": 1,
                                                "eval.every": 1})  # fmt: skip
    run_federation(LocalGrid(client_app, cfg, SILOS), cfg)
    kinds = [e["kind"] for e in server_ledger(run_dir) if e["kind"].startswith("distributed")]
    assert kinds == [dd.KIND_ALS]  # no histogram phase: nothing else spent
    report = sorted((run_dir / "state").glob("silo-*/*/silo-report.jsonl"))[0]
    evaluations = [json.loads(x) for x in report.read_text().splitlines() if '"evaluation"' in x]
    assert evaluations and all("dp-popularity-test-hits@10" in e for e in evaluations)
