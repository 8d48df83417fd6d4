"""DP alternating least squares: the bounded statistics, both steps and the sensitivity, by hand."""

import math

import numpy as np
import pytest

from common.privacy import dp_als
from common.privacy.dp_als import COUNT_SCALE as GAMMA
from common.privacy.dp_als import GRAM_SCALE as ETA


def test_the_sensitivity_is_the_norm_of_a_full_users_contribution():
    assert dp_als.sensitivity(4, 1.0) == pytest.approx(math.sqrt(4 + 4 * GAMMA**2 + ETA**2))
    assert dp_als.sensitivity(9, 2.0) == pytest.approx(math.sqrt(9 * 4 + 9 * GAMMA**2 + ETA**2 * 16))
    with pytest.raises(dp_als.DPALSError, match="als-max-items"):
        dp_als.sensitivity(0, 1.0)


def test_statistics_of_two_users_by_hand():
    # d = 1; user 0 has items {0, 1} (one repeated: counted once), user 1 item {1}; rows 2 and −0.5 → ±1 at B = 1
    users, items = np.array([0, 0, 0, 1]), np.array([0, 1, 1, 1])
    p = np.array([[2.0], [-0.5]])
    vec, mean_norm = dp_als.user_statistics(p, users, items, np.array([0, 1]), num_items=2, max_items=4, row_clip=1.0)
    b, c, g = dp_als.split_statistics(vec, 2, 1)
    assert b.ravel() == pytest.approx([1.0, 1.0 - 1.0])
    assert c == pytest.approx([GAMMA, 2 * GAMMA])
    assert g.ravel() == pytest.approx([ETA * 2.0])
    assert mean_norm == pytest.approx(1.25)
    # k = 1: user 0 (2 items) weighs 1/√2 on each
    vec, _ = dp_als.user_statistics(p, users, items, np.array([0]), num_items=2, max_items=1, row_clip=1.0)
    b, c, _ = dp_als.split_statistics(vec, 2, 1)
    assert b.ravel() == pytest.approx([1 / math.sqrt(2)] * 2)
    assert c == pytest.approx([GAMMA / math.sqrt(2)] * 2)


def test_one_users_contribution_never_exceeds_the_sensitivity_and_reaches_it_at_k_items():
    rng = np.random.default_rng(0)
    num_users, num_items, dim, k, clip = 30, 50, 4, 5, 0.7
    users = np.repeat(np.arange(num_users), rng.integers(1, 12, num_users))
    items = rng.integers(0, num_items, users.size)
    p = rng.normal(size=(num_users, dim)) * rng.uniform(0.1, 3.0, (num_users, 1))
    bound = dp_als.sensitivity(k, clip)
    total = np.zeros(dp_als.statistics_length(num_items, dim))
    for u in range(num_users):
        one, _ = dp_als.user_statistics(p, users, items, np.array([u]), num_items, k, clip)
        n_u = np.unique(items[users == u]).size
        assert np.linalg.norm(one) <= bound + 1e-12
        if n_u >= k:  # w_u² n_u = k: every term at its bound
            assert np.linalg.norm(one) == pytest.approx(bound)
        total += one
    everyone, _ = dp_als.user_statistics(p, users, items, np.arange(num_users), num_items, k, clip)
    np.testing.assert_allclose(everyone, total, atol=1e-12)  # the silo's sum is the sum of its users'


def test_the_item_step_by_hand():
    # b = [1, 0], c = γ·[1, 2], G = η·2 over N = 2 users, q = 1: Ĝ = 2, ĉ = [1, 2]
    # μ̄ = Σb/Σĉ = 1/3, Σ̂ = Ĝ/N − μ̄² = 8/9; Â = ĉ·Σ̂ + b²/max(ĉ, 1) = [8/9 + 1, 16/9]
    # lhs = Â + w₀·Ĝ + λ = Â + 0.5·2 + 1 → item 0: 17/9 + 2 = 35/9, so q_0 = 9/35; b_1 = 0, so q_1 = 0
    vec = np.array([1.0, 0.0, GAMMA, 2 * GAMMA, ETA * 2.0])
    rows = dp_als.item_rows(vec, 2, 1, population=2, rate=1.0, reg=1.0, unobserved=0.5)
    assert rows.ravel() == pytest.approx([9.0 / 35.0, 0.0])
    half = dp_als.item_rows(vec / 2.0, 2, 1, population=2, rate=0.5, reg=1.0, unobserved=0.5)
    assert half.ravel() == pytest.approx([9.0 / 35.0, 0.0])  # sums at rate q are divided by q
    noisy = vec.copy()
    noisy[2] = -5.0  # a negative noisy count is clipped at 0: μ̄ = 1/2, Σ̂ = 3/4, Â_0 = 0 + 1/max(0, 1)
    assert dp_als.item_rows(noisy, 2, 1, 2, 1.0, 1.0, 0.5).ravel() == pytest.approx([1.0 / 3.0, 0.0])
    with pytest.raises(dp_als.DPALSError, match="expected 5"):
        dp_als.item_rows(vec[:4], 2, 1, 2, 1.0, 1.0, 0.5)


def test_the_item_steps_grams_are_symmetrised_and_projected_onto_the_psd_cone():
    def psd(m):
        values, vectors = np.linalg.eigh(m)
        return (vectors * np.maximum(values, 0)) @ vectors.T

    g = np.array([[2.0, 1.0], [-3.0, -4.0]])  # sym: [[2, −1], [−1, −4]], eigenvalues 2.16, −4.16
    b = np.array([1.0, 0.0])
    vec = np.concatenate([b, [GAMMA * 1.0], ETA * g.ravel()])  # one item (count 1), d = 2, N = 1
    row = dp_als.item_rows(vec, 1, 2, population=1, rate=1.0, reg=1.0, unobserved=1.0)
    gram = psd(np.array([[2.0, -1.0], [-1.0, -4.0]]))
    cov = psd(gram - np.outer(b, b))  # μ̄ = b/1
    lhs = cov + np.outer(b, b) + gram + np.eye(2)  # Â = 1·Σ̂ + b bᵀ/1, + w₀·Ĝ + λI
    np.testing.assert_allclose(row[0], np.linalg.solve(lhs, b), rtol=1e-10)
    assert np.linalg.eigvalsh(gram).min() >= -1e-12 and np.linalg.eigvalsh(cov).min() >= -1e-12


def test_user_rows_are_each_users_exact_weighted_ridge_solution():
    rng = np.random.default_rng(1)
    num_users, num_items, dim, k, reg, w0 = 5, 8, 3, 2, 0.3, 0.05
    users = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    items = np.array([1, 4, 4, 2, 0, 7, 3, 5, 6, 1])
    q = rng.normal(size=(num_items, dim))
    rows = dp_als.user_rows(q, users, items, num_users, reg, w0, k)
    for u in range(num_users):
        own = np.unique(items[users == u])
        w = min(1.0, math.sqrt(k / max(own.size, 1)))
        lhs = w * q[own].T @ q[own] + w0 * q.T @ q + reg * np.eye(dim)
        want = np.linalg.solve(lhs, w * q[own].sum(axis=0)) if own.size else np.zeros(dim)
        np.testing.assert_allclose(rows[u], want, rtol=1e-10, atol=1e-12)
    assert not rows[4].any()  # user 4 has no items


def test_alternating_steps_without_noise_recover_a_planted_preference():
    # two groups of users who each like one block of items: one round of both steps separates them
    num_users, num_items = 40, 10
    users = np.repeat(np.arange(num_users), 5)
    items = np.concatenate([np.arange(5) if u < 20 else np.arange(5, 10) for u in range(num_users)])
    q = np.random.default_rng(2).normal(size=(num_items, 2)) * 0.5
    for _ in range(3):
        p = dp_als.user_rows(q, users, items, num_users, reg=0.1, unobserved=0.01, max_items=5)
        stats, _ = dp_als.user_statistics(p, users, items, np.arange(num_users), num_items, 5, 1.0)
        q = dp_als.item_rows(stats, num_items, 2, num_users, 1.0, reg=0.1, unobserved=0.01)
    p = dp_als.user_rows(q, users, items, num_users, reg=0.1, unobserved=0.01, max_items=5)
    scores = p @ q.T
    assert (scores[:20, :5].min(axis=1) > scores[:20, 5:].max(axis=1)).all()
    assert (scores[20:, 5:].min(axis=1) > scores[20:, :5].max(axis=1)).all()
