"""Distributed DP's anchor on the released DP popularity histogram and the server's step, by hand."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.config import AppConfig
from common.errors import ConfigError
from common.privacy import distributed as dd
from common.privacy.events import DISTRIBUTED_FEDAVG, DISTRIBUTED_HISTOGRAM, UNION_NEIGHBOURING, PrivacyRelease
from common.run_config import load_default_run_config
from server.distributed import (
    DistributedDP,
    ServerAdam,
    item_step_weights,
    popularity_biases,
    scaled_item_embeddings,
    server_step_velocity,
    with_popularity_biases,
)

HISTOGRAM = np.array([3.0, -1.0, 0.5])  # a released DP histogram over 3 items (one count negative)
POPULATION, SILOS = 20, 2  # q·N = 10 with users-per-round 10


def settings(**extra):
    cfg = load_default_run_config()
    cfg.update({
        "privacy.mode": "distributed", "strategy.norm-action": "none", "strategy.reject-opposed": False,
        "privacy.distributed.noise-multiplier": 2.0, "privacy.distributed.target-epsilon": 0.0,
        "privacy.distributed.users-per-round": 10.0, "privacy.distributed.server-lr": 0.5,
        "privacy.distributed.server-momentum": 0.0, **extra,
    })  # fmt: skip
    return AppConfig.from_run_config(cfg)


def model(emb=((1.0, 2.0), (3.0, 4.0), (5.0, 6.0)), bias=(0.1, 0.2, 0.3), glob=0.7):
    return ArrayRecord({
        "item_embedding.weight": Array(np.array(emb, dtype=np.float32)),
        "item_bias.weight": Array(np.array(bias, dtype=np.float32)[:, None]),
        "global_bias.value": Array(np.array([glob], dtype=np.float32)),
    })  # fmt: skip


def strategy(cfg, sums):
    """A DistributedDP past its round-1 prelude whose secure sums return ``sums`` in turn."""
    s = DistributedDP(cfg)
    s.mech = dd.mechanism(cfg.privacy.distributed, cfg.num_server_rounds, POPULATION, SILOS)
    s.accountant = dd.union_accountant(s.mech, "server")
    s.rosters = {1: 10, 2: 10}
    s.popularity = HISTOGRAM
    queue = list(sums)
    s._staged = lambda server_round, replies, what: {1: 10, 2: 10}  # type: ignore[method-assign]
    s._secure_sum = lambda *args: (queue.pop(0), 0)  # type: ignore[method-assign]
    return s


def step(s, server_round, arrays):
    s._sent = arrays
    out, _ = s.aggregate_train(server_round, [])
    return {k: v.numpy().astype(np.float64) for k, v in out.items()}


# flatten order (sorted names): global_bias.value (1), item_bias.weight (3), item_embedding.weight (3 × 2)
SUM = np.array([10.0, 1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0])


def test_the_anchor_is_exactly_the_scaled_centred_log_of_the_released_histogram():
    logs = np.array([math.log(4.0), 0.0, math.log(1.5)])  # log(1 + max(ĉ, 0))
    want = 0.5 * (logs - logs.mean())
    assert popularity_biases(HISTOGRAM, 0.5) == pytest.approx(want)
    out = with_popularity_biases(model(), HISTOGRAM, 0.5)
    assert out["item_bias.weight"].numpy().ravel() == pytest.approx(want, rel=1e-6)
    assert out["item_embedding.weight"].numpy() == pytest.approx(model()["item_embedding.weight"].numpy())


def test_item_init_scale_multiplies_the_initial_item_embeddings():
    out = scaled_item_embeddings(model(), 0.0)
    assert not out["item_embedding.weight"].numpy().any()
    assert out["item_bias.weight"].numpy().ravel() == pytest.approx([0.1, 0.2, 0.3])
    assert scaled_item_embeddings(model(), 0.5)["item_embedding.weight"].numpy()[2] == pytest.approx([2.5, 3.0])


def test_server_step_is_lr_times_the_sum_over_q_n_without_momentum():
    out = step(strategy(settings(), [SUM]), 1, model())
    mean = SUM / 10.0  # ÷ q·N_total = 10
    assert out["global_bias.value"] == pytest.approx([0.7 + 0.5 * mean[0]])
    assert out["item_bias.weight"].ravel() == pytest.approx(np.array([0.1, 0.2, 0.3]) + 0.5 * mean[1:4])
    assert out["item_embedding.weight"].ravel() == pytest.approx(np.arange(1.0, 7.0) + 0.5 * mean[4:], rel=1e-6)


def test_heavy_ball_momentum_by_hand():
    cfg = settings(**{"privacy.distributed.server-momentum": 0.9})
    s = strategy(cfg, [SUM, -SUM])
    first = step(s, 1, model())
    second = step(s, 2, model())
    v1 = SUM / 10.0
    v2 = 0.9 * v1 - SUM / 10.0  # β·v1 + ū2
    assert first["item_embedding.weight"].ravel() == pytest.approx(np.arange(1.0, 7.0) + 0.5 * v1[4:], rel=1e-6)
    assert second["item_embedding.weight"].ravel() == pytest.approx(np.arange(1.0, 7.0) + 0.5 * v2[4:], rel=1e-6)
    assert server_step_velocity(None, np.array([1.0]), 0.9) == pytest.approx([1.0])
    assert server_step_velocity(np.array([1.0]), np.array([2.0]), 0.5) == pytest.approx([2.5])


def test_server_adam_by_hand():
    adam = ServerAdam(lr=0.1, beta1=0.5, beta2=0.5, tau=1.0)
    # t = 1: m = [1, 0], v = [2, 0]; m̂ = m/0.5 = [2, 0], v̂ = v/0.5 = [4, 0]; step = 0.1·2/(2 + 1)
    assert adam.step(np.array([2.0, 0.0])) == pytest.approx([0.2 / 3.0, 0.0])
    # t = 2: m = 0.5·1 − 0.5·2 = −0.5, v = 0.5·2 + 0.5·4 = 3; m̂ = −0.5/0.75, v̂ = 3/0.75 = 4
    assert adam.step(np.array([-2.0, 0.0])) == pytest.approx([0.1 * (-0.5 / 0.75) / 3.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        adam.step(np.zeros(3))
    with pytest.raises(ValueError, match="tau"):
        ServerAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=0.0)


def test_the_strategy_steps_with_adam_on_the_released_mean_and_keeps_frozen_biases():
    cfg = settings(**{"privacy.distributed.server-optimizer": "adam", "privacy.distributed.server-lr": 0.1,
                      "privacy.distributed.server-momentum": 0.9, "privacy.distributed.server-beta2": 0.99,
                      "privacy.distributed.server-adam-eps": 0.5, "privacy.distributed.freeze-biases": True})  # fmt: skip
    s = strategy(cfg, [SUM, SUM])
    first = step(s, 1, model())
    mean = SUM[4:] / 10.0  # bias-corrected first step: m̂ = ū, v̂ = ū², step = lr·ū/(|ū| + τ)
    assert first["item_embedding.weight"].ravel() == pytest.approx(np.arange(1.0, 7.0) + 0.1 * mean / (mean + 0.5),
                                                                    rel=1e-6)  # fmt: skip
    assert first["item_bias.weight"].ravel() == pytest.approx([0.1, 0.2, 0.3])
    second = step(s, 2, model())  # the same ū again: m̂ = ū, v̂ = ū², the same step from the same model
    assert second["item_embedding.weight"] == pytest.approx(first["item_embedding.weight"], rel=1e-6)


def test_adam_refuses_a_beta_of_one():
    with pytest.raises(ConfigError, match="server-beta2"):
        settings(**{"privacy.distributed.server-optimizer": "adam", "privacy.distributed.server-beta2": 1.0})
    with pytest.raises(ConfigError, match="server-optimizer"):
        settings(**{"privacy.distributed.server-optimizer": "adagrad"})


def test_frozen_biases_stay_where_they_were_and_the_embeddings_step():
    out = step(strategy(settings(**{"privacy.distributed.freeze-biases": True}), [SUM]), 1, model())
    assert out["global_bias.value"] == pytest.approx([0.7])
    assert out["item_bias.weight"].ravel() == pytest.approx([0.1, 0.2, 0.3])
    assert out["item_embedding.weight"].ravel() == pytest.approx(np.arange(1.0, 7.0) + 0.05 * SUM[4:], rel=1e-6)


def test_item_step_weights_by_hand():
    # noise std σ·√(S/(S−T)) = 2·√2 = 2√2 (S = 2, T = 1); r = max(ĉ, 0)/(2√2); w = r²/(r² + κ²), κ = 1
    r2 = np.array([9.0, 0.0, 0.25]) / 8.0
    assert item_step_weights(HISTOGRAM, 2.0 * math.sqrt(2.0), 1.0) == pytest.approx(r2 / (r2 + 1.0))
    assert item_step_weights(HISTOGRAM, 0.0, 1.0) == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="item-step-kappa"):
        item_step_weights(HISTOGRAM, 1.0, 0.0)


def test_the_server_step_on_item_rows_is_weighted_and_the_embeddings_shrunk():
    cfg = settings(**{"privacy.distributed.item-step-kappa": 1.0, "privacy.distributed.item-shrink": 0.1})
    out = step(strategy(cfg, [SUM]), 1, model())
    w = np.array([9.0, 0.0, 0.25]) / 8.0
    w = w / (w + 1.0)
    mean = SUM / 10.0
    want_emb = (np.arange(1.0, 7.0).reshape(3, 2) + 0.5 * w[:, None] * mean[4:].reshape(3, 2)) * 0.9
    assert out["item_embedding.weight"] == pytest.approx(want_emb, rel=1e-6)
    assert out["item_bias.weight"].ravel() == pytest.approx(np.array([0.1, 0.2, 0.3]) + 0.5 * w * mean[1:4], rel=1e-6)
    assert out["global_bias.value"] == pytest.approx([0.7 + 0.5 * mean[0]])  # not an item row


@pytest.mark.parametrize("kind", [DISTRIBUTED_FEDAVG, DISTRIBUTED_HISTOGRAM])
def test_a_silos_view_of_a_distributed_release_names_the_union_roster(kind):
    rel = PrivacyRelease(
        owner="silo-2", server_round=1, kind=kind, unit="user", accountant="pld", delta=1e-5,
        delta_rule="default", epsilon=1.0, target_epsilon=8.0, noise_multiplier=1.0, sample_rate=0.1, clip=1.0,
        population=943, steps=1, total_steps=1, rounds_trained=1, released="the model",
    )  # fmt: skip
    assert rel.neighbouring == UNION_NEIGHBOURING
    assert "union roster" in rel.to_json()["neighbouring"] and "in one silo" not in rel.to_json()["neighbouring"]


def test_item_step_kappa_without_the_histogram_is_refused():
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="item-step-kappa.*popularity = true"):
        settings(**{"privacy.distributed.item-step-kappa": 1.0, "privacy.distributed.popularity": False})
