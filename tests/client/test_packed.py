"""Packed virtual clients (client/packed.py): K by-user clients per node give the run of one node per client."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client import packed, silo
from common.config import AppConfig
from common.data.pipeline import silo_data
from common.errors import ConfigError
from common.models import private_state
from common.run_config import load_default_run_config, merge_overrides
from common.rundir import RunDir
from common.storage import load_arrays
from server.registry import registered_weights
from simulations.inprocess import run_inprocess

USERS = 11  # by-user clients; K = 4 packs them into nodes of 4, 4 and 3


def _config(run_dir: Path, k: int, **extra: object) -> dict:
    return merge_overrides(
        load_default_run_config(),
        {
            "num-server-rounds": 2,
            "run-dir": str(run_dir),
            "data.partition": "by-user",
            "data.synthetic.num-users": USERS,
            "data.synthetic.num-items": 200,
            "data.synthetic.mean-interactions": 6,
            "model.dim": 4,
            "strategy.aggregator": "fedavg",
            "strategy.norm-action": "none",
            "strategy.reject-opposed": False,
            "strategy.min-nodes": 2,
            "simulation.clients-per-node": k,
            **extra,
        },
    )


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_node_users_cuts_users_into_consecutive_runs_of_k():
    assert packed.num_nodes(11, 4) == 3
    assert packed.num_nodes(12, 4) == 3
    assert [packed.node_users(p, 3, 4, 11) for p in range(3)] == [range(0, 4), range(4, 8), range(8, 11)]
    with pytest.raises(ConfigError, match="11 by-user clients need 3 simulated nodes .* got 11"):
        packed.node_users(0, 11, 4, 11)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"data.partition": "silos"}, "data.partition"),
        ({"privacy.mode": "central"}, "privacy.mode"),
        ({"strategy.aggregator": "median"}, "strategy.aggregator"),
        ({"strategy.norm-action": "clip"}, "strategy.norm-action"),
        ({"strategy.reject-opposed": True}, "strategy.reject-opposed"),
        ({"strategy.fraction-train": 0.5}, "strategy.fraction-train"),
        ({"strategy.fraction-evaluate": 0.5}, "strategy.fraction-evaluate"),
        ({"eval.val-users": 3}, "eval.val-users"),
        ({"eval.fused": True}, "eval.fused"),
        ({"personalize.enabled": True}, "personalize.enabled"),
    ],
)
def test_settings_that_need_each_clients_reply_are_refused(tmp_path, override, named):
    with pytest.raises(ConfigError, match=f"simulation.clients-per-node = 4 packs .* but {named}"):
        AppConfig.from_run_config(_config(tmp_path, 4, **override))


def test_auto_aggregator_becomes_fedavg_when_packed(tmp_path):
    cfg = AppConfig.from_run_config(_config(tmp_path, 4, **{"strategy.aggregator": "auto"}))
    assert cfg.strategy.aggregator == "fedavg"
    assert AppConfig.from_run_config(_config(tmp_path, 1, **{"strategy.aggregator": "auto"})).strategy.aggregator == (
        "trimmed-mean"
    )


def test_a_node_reads_only_its_users_the_same_rows_as_a_node_of_their_own(tmp_path):
    cfg = AppConfig.from_run_config(_config(tmp_path, 4))
    where = packed.ensure_pooled(cfg, str(tmp_path))
    node = packed.load_users(where, range(4, 8))
    assert node.split.num_users == 4
    for i, user in enumerate(range(4, 8)):
        alone = silo_data(cfg.data, cfg.seed, user, USERS).split
        mine = node.split.train_item[node.split.train_user == i]
        np.testing.assert_array_equal(mine, alone.train_item)  # same rows, same order
        for name in ("val_item", "test_item", "val_negatives", "test_negatives", "user_global_idx"):
            np.testing.assert_array_equal(getattr(node.split, name)[i], getattr(alone, name)[0])


def test_initial_user_rows_are_those_of_a_node_of_their_own(tmp_path):
    cfg = AppConfig.from_run_config(_config(tmp_path, 4))
    rows = packed.initial_user_rows(cfg, range(4, 8), 200)
    state = torch.random.get_rng_state()
    for i, user in enumerate(range(4, 8)):
        alone = silo_data(cfg.data, cfg.seed, user, USERS)
        own = private_state(silo.new_model(cfg, alone, user))
        for name, value in own.items():
            torch.testing.assert_close(rows[name][i : i + 1], value, rtol=0, atol=0)
    assert rows["user_embedding.weight"].shape == (4, 4)
    torch.random.set_rng_state(state)


def test_registered_weight_of_a_node_is_its_users_training_interactions(tmp_path):
    cfg = AppConfig.from_run_config(_config(tmp_path, 4))
    per_user = [len(silo_data(cfg.data, cfg.seed, u, USERS).split.train_item) for u in range(USERS)]
    assert registered_weights(cfg, 3) == {0: sum(per_user[:4]), 1: sum(per_user[4:8]), 2: sum(per_user[8:])}


def test_packed_run_equals_one_node_per_client(tmp_path):
    """Same final model (float rounding), same training weights and evaluation sums, every round."""
    packed.forget_nodes()
    one = tmp_path / "one"
    run_inprocess(_config(one, 1), USERS)
    four = tmp_path / "four"
    grid = run_inprocess(_config(four, 4), 3)
    assert len(list(grid.get_node_ids())) == 3
    a, b = load_arrays(RunDir(one).final_model), load_arrays(RunDir(four).final_model)
    assert list(a.keys()) == list(b.keys())
    for name in a:
        np.testing.assert_allclose(b[name].numpy(), a[name].numpy(), rtol=1e-5, atol=1e-6)
        assert not np.allclose(a[name].numpy(), load_arrays(RunDir(one).initial_model)[name].numpy()) or name == (
            "global_bias.value"
        )
    for r1, r4 in zip(_rounds(one), _rounds(four), strict=True):
        assert r4["train"]["num-examples"] == r1["train"]["num-examples"]
        assert r4["train"]["train-loss"] == pytest.approx(r1["train"]["train-loss"], rel=1e-6)
        assert r4["train"]["silos"] == 3 and r1["train"]["silos"] == USERS  # nodes whose replies were combined
        for key, value in r1["evaluate"].items():
            if key == "silos":
                continue
            assert r4["evaluate"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
