"""``privacy.distributed.frozen-dims`` and ``user-l2``: the item table's public columns stay, by hand."""

import copy

import numpy as np
import pytest
import torch

from client.distributed import clipped_delta_sum, fit_user_rows
from common.errors import ConfigError
from common.seeding import numpy_rng
from common.training import interaction_loss, interaction_negatives
from tests.server.test_distributed_anchor import SUM, model, settings, step, strategy
from tests.server.test_distributed_round import _cfg, _toy


def _hand_delta(mf, split, cfg, user, lr, steps, frozen):
    """``steps`` SGD steps of ``lr`` on ``user``'s mean loss, the first ``frozen`` item columns held; the change."""
    mf = copy.deepcopy(mf)
    before = {k: v.detach().clone() for k, v in mf.named_parameters()}
    rng = numpy_rng(cfg.seed, "distributed-negatives", 0, 1)
    mask = split.train_user == user
    neg = interaction_negatives(int(rng.integers(2**63)), split.train_user[mask], split.train_item[mask],
                                cfg.train.num_negatives, split.num_items)  # fmt: skip
    items = torch.from_numpy(np.concatenate([split.train_item[mask, None], neg], axis=1))
    users = torch.full((int(mask.sum()),), user)
    for _ in range(steps):
        mf.zero_grad()
        interaction_loss(mf(users, items), cfg.train.loss).mean().backward()
        with torch.no_grad():
            for name, param in mf.named_parameters():
                grad = param.grad.clone()
                if name == "item_embedding.weight":
                    grad[:, :frozen] = 0.0
                param -= lr * grad
    after = dict(mf.named_parameters())
    return np.concatenate([(after[k] - before[k]).detach().numpy().ravel()
                           for k in ("global_bias.value", "item_bias.weight", "item_embedding.weight")])  # fmt: skip


@pytest.mark.parametrize("steps", [1, 3])
def test_the_frozen_columns_stay_in_the_local_steps_and_are_zero_in_the_delta(steps):
    split, mf = _toy()  # MF of dim 3
    cfg = _cfg(**{"privacy.distributed.lr": 0.5, "train.l2": 0.0, "train.local-epochs": steps,
                  "privacy.distributed.frozen-dims": 2})  # fmt: skip
    total, clipped = clipped_delta_sum(mf, split, cfg, np.array([2]), clip=1e6, partition_id=0, server_round=1)
    assert clipped == 0
    emb = total[7:].reshape(6, 3)  # after the global bias (1) and the item biases (6)
    assert np.all(emb[:, :2] == 0.0)
    assert np.any(emb[:, 2] != 0.0)
    np.testing.assert_allclose(total, _hand_delta(mf, split, cfg, 2, 0.5, steps, frozen=2), rtol=1e-5, atol=1e-7)
    if steps > 1:  # the held columns change what the later steps see: not the delta of a run that moved them
        free = clipped_delta_sum(mf, split, _cfg(**{"privacy.distributed.lr": 0.5, "train.l2": 0.0,
                                                    "train.local-epochs": steps}), np.array([2]), 1e6, 0, 1)[0]  # fmt: skip
        assert not np.allclose(free[7:].reshape(6, 3)[:, 2], emb[:, 2])


def test_the_clip_bounds_the_learned_columns_alone():
    split, mf = _toy(num_users=5)
    cfg = _cfg(**{"privacy.distributed.lr": 5.0, "privacy.distributed.frozen-dims": 1})
    for user in (1, 3):
        total, clipped = clipped_delta_sum(mf, split, cfg, np.array([user]), clip=0.05, partition_id=0, server_round=2)
        assert clipped == 1
        assert np.linalg.norm(total) == pytest.approx(0.05, rel=1e-6)
        assert np.all(total[7:].reshape(6, 3)[:, 0] == 0.0)


def test_the_server_step_and_the_shrink_leave_the_frozen_columns_as_sent():
    cfg = settings(**{"privacy.distributed.frozen-dims": 1, "privacy.distributed.item-shrink": 0.1})
    out = step(strategy(cfg, [SUM]), 1, model())
    sent = np.arange(1.0, 7.0).reshape(3, 2)
    mean = SUM / 10.0  # ÷ q·N_total = 10; server lr 0.5
    assert out["item_embedding.weight"][:, 0] == pytest.approx(sent[:, 0])  # exactly as the server sent it
    assert out["item_embedding.weight"][:, 1] == pytest.approx((sent[:, 1] + 0.5 * mean[4:].reshape(3, 2)[:, 1]) * 0.9,
                                                               rel=1e-6)  # fmt: skip
    assert out["item_bias.weight"].ravel() == pytest.approx(np.array([0.1, 0.2, 0.3]) + 0.5 * mean[1:4], rel=1e-6)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"privacy.distributed.frozen-dims": 8, "model.dim": 8}, "frozen-dims: 8 frozen columns leave none"),
        ({"privacy.distributed.frozen-dims": 2, "privacy.distributed.algorithm": "als"}, "frozen-dims: DP-ALS"),
        ({"privacy.distributed.frozen-dims": 2, "privacy.distributed.top-items": 5}, "frozen-dims: top-items"),
    ],
)
def test_config_refuses_frozen_dims_it_cannot_honour(extra, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**extra)


def test_the_users_rows_take_user_l2_and_not_train_l2():
    split, mf = _toy()
    base = {"privacy.distributed.user-steps": 5, "privacy.distributed.user-lr": 0.1}

    def rows(**extra):
        m = copy.deepcopy(mf)
        fit_user_rows(m, split, _cfg(**base, **extra), partition_id=0, server_round=1)
        return m.user_embedding.weight.detach().numpy()

    plain = rows(**{"train.l2": 0.0})
    np.testing.assert_array_equal(rows(**{"train.l2": 10.0}), plain)  # train.l2 is the item rows' L2 only
    shrunk = rows(**{"privacy.distributed.user-l2": 10.0})
    assert np.linalg.norm(shrunk) < np.linalg.norm(plain)
