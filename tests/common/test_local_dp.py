"""Local DP training of a silo: what one unit's data can and cannot change."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from common.config import AppConfig, TrainSettings
from common.data.split import NO_ITEM, UserSplit
from common.models import Recommender, build_model, lookup_rows
from common.privacy.dpsgd import SparseDPSGD
from common.privacy.local import (
    LocalDPSettings,
    _user_negatives,
    dp_train,
    fit_user_rows,
    per_sample_losses,
    step_items,
)
from common.run_config import load_default_run_config
from common.training import interaction_negatives, keyed_integers, train_item_keys

NUM_USERS, NUM_ITEMS, DIM = 6, 40, 8


@pytest.fixture(scope="module")
def settings() -> TrainSettings:
    return AppConfig.from_run_config(load_default_run_config()).train


def _split(users: np.ndarray, items: np.ndarray, num_users: int = NUM_USERS) -> UserSplit:
    return UserSplit(
        num_items=NUM_ITEMS,
        train_user=users.astype(np.int64),
        train_item=items.astype(np.int64),
        val_item=np.full(num_users, NO_ITEM, dtype=np.int64),
        test_item=np.full(num_users, NO_ITEM, dtype=np.int64),
        val_negatives=np.zeros((num_users, 0), dtype=np.int64),
        test_negatives=np.zeros((num_users, 0), dtype=np.int64),
        user_global_idx=np.arange(num_users, dtype=np.int64),
    )


def _interactions(seed: int = 1, per_user: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.default_rng(seed)
    users = np.repeat(np.arange(NUM_USERS), per_user)
    items = np.concatenate([rs.choice(NUM_ITEMS, per_user, replace=False) for _ in range(NUM_USERS)])
    return users, items


def _model(name: str) -> Recommender:
    torch.manual_seed(0)
    return build_model(name, NUM_USERS, NUM_ITEMS, DIM, (16, 8))


def _interaction_step(name: str, split: UserSplit, settings: TrainSettings, step_seed: int):
    """One interaction-unit step on every interaction of ``split``: per-sample gradients and norms.

    The batch is every training interaction (what a Poisson batch with q = 1 holds);
    its negatives come from :func:`step_items`, as in ``dp_train``. Returns the item
    ids read (B, 1 + k), each sample's gradient of each table's rows (from the
    gathered rows, as the engine computes them) and the engine's per-sample norms over
    every released parameter (tables, and NeuMF's MLP and output layer).
    """
    users, positives = split.train_user, split.train_item[:, None]
    items = step_items(
        "interaction", None, users, positives, settings.num_negatives, NUM_ITEMS, np.random.default_rng(step_seed)
    )
    users_t, items_t = torch.from_numpy(users), torch.from_numpy(items)
    mask = torch.ones((len(users), 1), dtype=torch.bool)
    # Per-sample row gradients of every table (user rows are released in this unit).
    model = _model(name)
    rows = {n: getattr(model, n).weight.detach()[users_t].requires_grad_(True) for n in model.user_tables}
    rows.update({n: getattr(model, n).weight.detach()[items_t].requires_grad_(True) for n in model.item_tables})
    per_sample_losses(model, rows, mask, settings).sum().backward()
    grads = {n: r.grad for n, r in rows.items()}
    # Per-sample norms over all released parameters, from the engine itself.
    model = _model(name)
    engine = SparseDPSGD(model, noise_multiplier=0.0, clip=math.inf, lr=0.1, expected_batch_size=10.0)
    engine.step(users_t, items_t, lambda r: per_sample_losses(model, r, mask, settings))
    engine.close()
    return items, grads, engine.last_norms


@pytest.mark.parametrize("name", ["mf", "neumf"])
@pytest.mark.parametrize("removed", [0, 17, 41])  # the first, a middle and the last interaction
def test_removing_an_interaction_changes_no_other_samples_gradient(settings, name: str, removed: int):
    # Arrange: the same silo with and without one interaction (u, j); same seeds
    users, items = _interactions()
    with_j = _split(users, items)
    without_j = _split(np.delete(users, removed), np.delete(items, removed))
    others = np.delete(np.arange(len(users)), removed)
    # Act
    items_a, grads_a, norms_a = _interaction_step(name, with_j, settings, step_seed=3)
    items_b, grads_b, norms_b = _interaction_step(name, without_j, settings, step_seed=3)
    # Assert: every other sample reads the same negatives and has a bit-identical gradient ...
    np.testing.assert_array_equal(items_a[others], items_b)
    for table, grad in grads_a.items():
        assert torch.equal(grad[others], grads_b[table]), table
    assert torch.equal(norms_a[others], norms_b)
    # ... and exactly one sample (the removed interaction's) is gone.
    assert len(norms_a) == len(norms_b) + 1
    assert norms_a[removed] > 0


def test_interaction_negatives_exclude_only_their_own_positive():
    # Arrange: many users, each with positives 0..8 of a 10-item catalogue
    n = 9 * 20_000
    users = np.arange(n, dtype=np.int64) // 9
    positives = np.arange(n, dtype=np.int64) % 9
    # Act
    negatives = interaction_negatives(11, users, positives, 4, 10)
    # Assert: never the interaction's own positive, but the user's other positives do occur
    assert negatives.shape == (n, 4)
    assert not (negatives == positives[:, None]).any()
    for p in range(9):
        drawn = negatives[positives == p].ravel()
        counts = np.bincount(drawn, minlength=10)
        assert counts[p] == 0
        assert stats.chisquare(np.delete(counts, p)).pvalue > 1e-3, p  # uniform over the other 9


def test_interaction_negatives_respect_high_and_canary_positives():
    # Arrange: items 8 and 9 are canaries (high = 8); one canary positive
    users = np.arange(5000, dtype=np.int64)
    positives = np.where(users % 2 == 0, 3, 9)
    # Act
    negatives = interaction_negatives(5, users, positives, 3, 10, high=8)
    # Assert
    assert negatives.max() < 8 and negatives.min() >= 0
    assert not (negatives[positives == 3] == 3).any()
    assert set(np.unique(negatives[positives == 9]).tolist()) == set(range(8))


def test_keyed_integers_depend_only_on_the_key_and_their_own_parts():
    # Arrange
    ids = np.arange(1000)
    # Act
    all_draws = keyed_integers(42, (ids, 7), 97)
    some_draws = keyed_integers(42, (ids[500:], 7), 97)
    other_key = keyed_integers(43, (ids, 7), 97)
    # Assert
    np.testing.assert_array_equal(all_draws[500:], some_draws)
    assert (all_draws != other_key).mean() > 0.9
    assert all_draws.min() >= 0 and all_draws.max() < 97


def _refit(name: str, split: UserSplit, settings: TrainSettings, num_users: int, key: int = 99) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(name, num_users, NUM_ITEMS, DIM, (16, 8))
    shared = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("user_")}
    fit_user_rows(model, split, settings, epochs=2, lr=0.05, width=4, key=key, device=torch.device("cpu"))
    for n, p in model.named_parameters():  # the shared model is read, never changed
        if n in shared:
            assert torch.equal(p.detach(), shared[n]), n
    return {n: getattr(model, n).weight.detach().clone() for n in model.user_tables}


def _users_with(counts: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.default_rng(seed)
    users = np.repeat(np.arange(len(counts)), counts)
    items = np.concatenate([rs.choice(NUM_ITEMS, c, replace=False) for c in counts])
    return users, items


@pytest.mark.parametrize("name", ["mf", "neumf"])
@pytest.mark.parametrize("other_count", [3, 9, 21])  # fewer, as many and more refit steps than u
def test_a_users_refit_row_does_not_depend_on_other_users_data(settings, name: str, other_count: int):
    # Arrange: 8 users; the two silos differ only in user 3's interactions
    counts = [5, 9, 3, 12, 7, 4, 6, 10]
    users, items = _users_with(counts, seed=0)
    other = 3
    changed = np.random.default_rng(1).choice(NUM_ITEMS, other_count, replace=False)
    users_b = np.concatenate([users[users != other], np.full(other_count, other)])
    items_b = np.concatenate([items[users != other], changed])
    order = np.argsort(users_b, kind="stable")
    # Act: the same shared model, the same key
    rows_a = _refit(name, _split(users, items, 8), settings, 8)
    rows_b = _refit(name, _split(users_b[order], items_b[order], 8), settings, 8)
    # Assert: every other user's rows are bit-identical; user 3's differ
    for table in rows_a:
        for u in range(8):
            same = torch.equal(rows_a[table][u], rows_b[table][u])
            assert same == (u != other), (table, u)


def test_a_users_refit_row_does_not_depend_on_which_other_users_exist(settings):
    # Arrange: the same users 0..4, then the silo without user 2 (user-level neighbours)
    users, items = _users_with([5, 9, 3, 12, 7], seed=2)
    keep = users != 2
    # Act
    rows_a = _refit("mf", _split(users, items, 5), settings, 5)
    rows_b = _refit("mf", _split(users[keep], items[keep], 5), settings, 5)
    # Assert: users 0, 1, 3, 4 unchanged bit for bit; user 2 keeps its initial row
    for table in rows_a:
        for u in (0, 1, 3, 4):
            assert torch.equal(rows_a[table][u], rows_b[table][u]), (table, u)
    torch.manual_seed(0)
    initial = build_model("mf", 5, NUM_ITEMS, DIM)
    assert torch.equal(rows_b["user_embedding"][2], initial.user_embedding.weight.detach()[2])


def test_refit_lowers_each_users_own_loss(settings):
    # Arrange
    users, items = _users_with([8, 12, 6, 10, 9, 7], seed=3)
    split = _split(users, items)
    torch.manual_seed(0)
    model = build_model("mf", NUM_USERS, NUM_ITEMS, DIM)
    mask = torch.ones((1, 1), dtype=torch.bool)

    def loss_of(u: int) -> float:
        # The user's summed BCE over its positives with fixed negatives.
        mine = items[users == u]
        others = np.setdiff1d(np.arange(NUM_ITEMS), mine)[:4]
        total = 0.0
        for i in mine:
            reads = torch.from_numpy(np.array([[i, *others]]))
            rows = {n: getattr(model, n).weight.detach()[torch.tensor([u])] for n in model.user_tables}
            rows.update({n: getattr(model, n).weight.detach()[reads] for n in model.item_tables})
            total += float(per_sample_losses(model, rows, mask, settings).detach())
        return total

    before = [loss_of(u) for u in range(NUM_USERS)]
    # Act
    fit_user_rows(model, split, settings, epochs=5, lr=0.05, width=4, key=7, device=torch.device("cpu"))
    # Assert
    after = [loss_of(u) for u in range(NUM_USERS)]
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)


def test_refit_negatives_avoid_the_users_training_items(settings):
    # Arrange: user 0 trained on items 0..29 of 40, user 1 on 0..4
    users = np.concatenate([np.zeros(30, dtype=np.int64), np.ones(5, dtype=np.int64)])
    items = np.concatenate([np.arange(30), np.arange(5)])
    split = _split(users, items, 2)
    # Act
    negatives = _user_negatives(
        train_item_keys(split), np.array([0, 1]), 16, 50, NUM_ITEMS, key=3, step=(0, 0), high=None
    )
    # Assert
    assert negatives.shape == (2, 16, 50)
    assert negatives[0].min() >= 30 and negatives[1].min() >= 5 and negatives.max() < NUM_ITEMS
    assert set(np.unique(negatives[0]).tolist()) == set(range(30, NUM_ITEMS))


@pytest.mark.parametrize(("refit_positives", "width"), [(None, 5), (3, 3)])
def test_dp_train_refits_with_the_configured_width_and_a_fresh_key(settings, monkeypatch, refit_positives, width):
    # Arrange: record the refit's arguments
    import common.privacy.local as local

    calls: list[dict] = []
    monkeypatch.setattr(local, "fit_user_rows", lambda *args, **kwargs: calls.append(kwargs))
    users, items = _interactions()
    dp = LocalDPSettings(
        unit="user", noise_multiplier=1.0, clip=1.0, lr=0.1, user_lr=0.05, expected_batch_size=3,
        max_positives=5, user_epochs=2, user_refit_positives=refit_positives,
    )
    # Act
    for seed in (0, 1):
        dp_train(_model("mf"), _split(users, items), settings, dp, steps=1, rng=np.random.default_rng(seed),
                 generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    # Assert
    assert [(c["epochs"], c["lr"], c["width"]) for c in calls] == [(2, 0.05, width)] * 2
    assert calls[0]["key"] != calls[1]["key"]


# ---------------------------------------------------------------- zero-out relation
def test_user_roster_is_public_zeroing_a_users_interactions_keeps_n_and_q():
    """Zero-out neighbours: N and q come from the roster, not from anyone's interactions."""
    from common.privacy.local import UnitSampler

    users, items = _interactions()
    full = UnitSampler(_split(users, items), "user", 3, 4)
    keep = users != 2  # user 2's interactions replaced by none
    zeroed = UnitSampler(_split(users[keep], items[keep]), "user", 3, 4)
    assert full.population == zeroed.population == NUM_USERS
    assert full.sample_rate == zeroed.sample_rate == 0.5
    assert zeroed.counts[2] == 0


def test_a_user_without_interactions_is_sampled_but_contributes_exactly_zero(settings):
    """A sampled user with no interactions: all positives masked, zero per-sample gradient."""
    from common.privacy.local import UnitSampler

    users, items = _interactions()
    keep = users != 2
    split = _split(users[keep], items[keep])
    sampler = UnitSampler(split, "user", NUM_USERS, 4)  # q = 1: every user is sampled
    batch_users, positives, mask = sampler.sample(np.random.default_rng(0))
    assert batch_users.tolist() == list(range(NUM_USERS))
    assert not mask[2].any() and mask[[0, 1, 3, 4, 5]].all()
    model = _model("mf")
    rng = np.random.default_rng(1)
    step = step_items("user", train_item_keys(split), batch_users, positives, 2, NUM_ITEMS, rng)
    rows = lookup_rows(model, torch.from_numpy(batch_users), torch.from_numpy(step))
    shared = {n: r.detach().requires_grad_(True) for n, r in rows.items() if n in model.item_tables}
    rows.update(shared)
    loss = per_sample_losses(model, rows, torch.from_numpy(mask), settings)[2]
    grads = torch.autograd.grad(loss, list(shared.values()), allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_accountants_use_the_zero_out_relation():
    import dp_accounting

    from common.privacy.accounting import NEIGHBOURING_RELATION, _fresh
    from common.privacy.events import RELATION

    assert RELATION == "zero-out"
    assert NEIGHBOURING_RELATION is dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    assert _fresh("pld").neighboring_relation is NEIGHBOURING_RELATION
    assert _fresh("rdp").neighboring_relation is NEIGHBOURING_RELATION
