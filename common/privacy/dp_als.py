"""Distributed DP alternating least squares (``privacy.distributed.algorithm = "als"``).

Implicit-feedback ALS (iALS) with the item side computed from DP sufficient statistics
over secure aggregation; each user's own row is solved exactly in their silo and never
leaves it. The objective, for user rows p_u, item rows q_i, unobserved weight w₀, ridge λ:

    Σ_(u,i) observed  w_u·(p_u·q_i − 1)²  +  w₀·Σ_u Σ_i (p_u·q_i)²  +  λ·(‖P‖² + ‖Q‖²)

Each round:

1. **User step (silo, exact, never released).** p_u = (w_u·Σ_{i∈I_u} q_i q_iᵀ + w₀·QᵀQ + λI)⁻¹ w_u·Σ_{i∈I_u} q_i
   over u's distinct training items, against the public Q the server sent (:func:`user_rows`).
2. **Statistics (silo).** Each Poisson-sampled user adds, with p̃_u = B·p_u/‖p_u‖ (the row's
   direction at norm B: ALS's scale is free, and the noise is calibrated to B)
   and w_u = min(1, √(k/n_u)) (n_u distinct items, k = ``als-max-items``):
   ``b_i += w_u·p̃_u`` and ``c_i += γ·w_u`` for each i ∈ I_u, and ``G += η·p̃_u p̃_uᵀ``
   (:func:`user_statistics`). One user's contribution has L2 norm at most
   Δ = √(k·B² + k·γ² + η²·B⁴) (:func:`sensitivity`): Σ_{i∈I_u} w_u²‖p̃_u‖² ≤ k·B²,
   Σ_{i∈I_u} γ²w_u² ≤ k·γ², ‖η p̃ p̃ᵀ‖_F = η‖p̃‖² ≤ η·B². Δ plays C's role in the
   distributed mechanism: each silo adds its share σ·Δ/√(S − T) and the secure sum is one
   (Poisson-subsampled) Gaussian release per round, accounted exactly as a DP-FedAvg round.
3. **Item step (server, post-processing).** From the released sums divided by q:
   Ĝ = sym(G)/η projected onto the PSD cone, ĉ_i = max(c_i/γ, 0), and
   q_i = (Â_i + w₀·Ĝ + λI)⁻¹ b̂_i (:func:`item_rows`). The item's own Gram
   A_i = Σ_{u∋i} w_u p̃_u p̃_uᵀ is never released (a d×d matrix per item would multiply the
   noise); it is estimated by its first two moments, Â_i = ĉ_i·Σ̂ + b̂_i b̂_iᵀ/max(ĉ_i, 1):
   the rows of item i's users have mean b̂_i/ĉ_i and, approximately, the population's
   covariance Σ̂ = PSD(Ĝ/N − μ̄μ̄ᵀ), μ̄ = Σ_i b̂_i / Σ_i ĉ_i.

γ = :data:`COUNT_SCALE` and η = :data:`GRAM_SCALE` shrink the counts' and the Gram's share of
Δ: both are sums over many users, so their signal dwarfs the noise even at γ, η < 1.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import torch

COUNT_SCALE: Final = 0.25  # γ
GRAM_SCALE: Final = 0.25  # η
_CHUNK: Final = 1 << 16  # interactions per outer-product pass


class DPALSError(ValueError):
    """Invalid DP-ALS parameters or statistics (names what and where)."""


def sensitivity(max_items: int, row_clip: float) -> float:
    """Δ = √(k·B² + k·γ² + η²·B⁴): the L2 bound of one user's contribution to a round's statistics."""
    if max_items < 1 or row_clip <= 0:
        raise DPALSError(f"privacy.distributed.als-max-items >= 1 and als-row-clip > 0, got {max_items}, {row_clip}")
    return math.sqrt(max_items * row_clip**2 + max_items * COUNT_SCALE**2 + GRAM_SCALE**2 * row_clip**4)


def statistics_length(num_items: int, dim: int) -> int:
    """Length of the flat statistics vector: b (items × dim), c (items), G (dim × dim), in that order."""
    return num_items * dim + num_items + dim * dim


def distinct_pairs(users: np.ndarray, items: np.ndarray, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (user, item) training pairs, sorted by user."""
    pairs = np.unique(np.asarray(users, dtype=np.int64) * num_items + np.asarray(items, dtype=np.int64))
    return pairs // num_items, pairs % num_items


def interaction_weights(n_u: np.ndarray, max_items: int) -> np.ndarray:
    """w_u = min(1, √(k/n_u)): a user's weight on their observed terms (n_u distinct items; 1 when n_u = 0)."""
    return np.minimum(1.0, np.sqrt(max_items / np.maximum(np.asarray(n_u, dtype=np.float64), 1.0)))


def user_rows(
    q: np.ndarray, users: np.ndarray, items: np.ndarray, num_users: int, reg: float, unobserved: float,
    max_items: int,
) -> np.ndarray:  # fmt: skip
    """Every user's exact ALS row against the item table ``q`` (users with no items: 0).

    p_u = (w_u·Σ_{i∈I_u} q_i q_iᵀ + w₀·QᵀQ + λI)⁻¹ w_u·Σ_{i∈I_u} q_i: the minimiser of the
    module's objective in p_u alone, so it uses u's own items and the public Q only.
    """
    q64 = torch.from_numpy(np.asarray(q, dtype=np.float64))
    dim = q64.shape[1]
    u, i = distinct_pairs(users, items, q64.shape[0])
    w = torch.from_numpy(interaction_weights(np.bincount(u, minlength=num_users), max_items))
    lhs = torch.zeros(num_users, dim, dim, dtype=torch.float64)
    rhs = torch.zeros(num_users, dim, dtype=torch.float64)
    for lo in range(0, u.size, _CHUNK):
        uu, rows = torch.from_numpy(u[lo : lo + _CHUNK]), q64[torch.from_numpy(i[lo : lo + _CHUNK])]
        lhs.index_add_(0, uu, rows[:, :, None] * rows[:, None, :])
        rhs.index_add_(0, uu, rows)
    base = unobserved * (q64.T @ q64) + reg * torch.eye(dim, dtype=torch.float64)
    lhs = w[:, None, None] * lhs + base
    return torch.linalg.solve(lhs, (w[:, None] * rhs)[:, :, None])[:, :, 0].numpy()


def user_statistics(
    p: np.ndarray, users: np.ndarray, items: np.ndarray, sampled: np.ndarray, num_items: int, max_items: int,
    row_clip: float,
) -> tuple[np.ndarray, float]:  # fmt: skip
    """Σ over the ``sampled`` users of their bounded contributions (see the module docstring), flat.

    Returns the vector (:func:`statistics_length`) and the sampled users' mean row norm before scaling.
    """
    p = np.asarray(p, dtype=np.float64)
    num_users, dim = p.shape
    sensitivity(max_items, row_clip)
    norms = np.linalg.norm(p, axis=1)
    p_clip = p * np.where(norms > 0, row_clip / np.maximum(norms, 1e-300), 0.0)[:, None]
    chosen = np.zeros(num_users, dtype=bool)
    chosen[np.asarray(sampled, dtype=np.int64)] = True
    u, i = distinct_pairs(users, items, num_items)
    keep = chosen[u]
    u, i = u[keep], i[keep]
    n_u = np.bincount(u, minlength=num_users)
    w = interaction_weights(n_u, max_items)
    b = torch.zeros(num_items, dim, dtype=torch.float64).index_add_(
        0, torch.from_numpy(i), torch.from_numpy(w[u, None] * p_clip[u])
    ).numpy()
    c = np.bincount(i, weights=COUNT_SCALE * w[u], minlength=num_items).astype(np.float64)
    active = p_clip[chosen & (n_u > 0)]
    g = GRAM_SCALE * (active.T @ active)
    mean_norm = float(norms[chosen].mean()) if chosen.any() else 0.0
    return np.concatenate([b.ravel(), c, g.ravel()]), mean_norm


def split_statistics(vector: np.ndarray, num_items: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """b (items × dim), c (items), G (dim × dim) of a flat statistics vector."""
    vector = np.asarray(vector, dtype=np.float64).ravel()
    if vector.size != statistics_length(num_items, dim):
        raise DPALSError(
            f"DP-ALS statistics: {vector.size} values, expected {statistics_length(num_items, dim)} for "
            f"{num_items} items of dimension {dim}"
        )
    nb = num_items * dim
    return vector[:nb].reshape(num_items, dim), vector[nb : nb + num_items], vector[nb + num_items :].reshape(dim, dim)


def released_counts(released: np.ndarray, num_items: int, dim: int, rate: float) -> np.ndarray:
    """ĉ: the released statistics' weighted item counts (c/(γ·q), may be negative): a DP popularity histogram."""
    _, c, _ = split_statistics(released, num_items, dim)
    return c / (COUNT_SCALE * rate)


def _psd(matrix: np.ndarray) -> np.ndarray:
    """The nearest (Frobenius) positive semi-definite matrix to a symmetric ``matrix``."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.maximum(values, 0.0)) @ vectors.T


def item_rows(
    released: np.ndarray, num_items: int, dim: int, population: int, rate: float, reg: float, unobserved: float
) -> np.ndarray:
    """The server's item step from the released (noised) sums; post-processing (module docstring)."""
    if population < 1 or not 0 < rate <= 1:
        raise DPALSError(f"DP-ALS item step: need N_total >= 1 and q in (0, 1], got {population}, {rate}")
    b, _, g = split_statistics(released, num_items, dim)
    b, g = b / rate, g / rate
    gram = _psd((g + g.T) / (2.0 * GRAM_SCALE))
    counts = np.maximum(released_counts(released, num_items, dim, rate), 0.0)
    mean = b.sum(axis=0) / max(float(counts.sum()), 1e-12)  # μ̄: the interactions' mean row
    cov = _psd(gram / population - np.outer(mean, mean))  # Σ̂
    spread = b[:, :, None] * b[:, None, :] / np.maximum(counts, 1.0)[:, None, None]  # ĉ_i·(mean row)(mean row)ᵀ
    item_gram = counts[:, None, None] * cov[None] + spread
    lhs = item_gram + unobserved * gram[None] + reg * np.eye(dim)[None]
    return np.linalg.solve(lhs, b[:, :, None])[:, :, 0]
