"""Fold-in: fit new users' private rows from their interactions against the frozen shared model.

In the spirit of Federated Reconstruction (Singhal et al., NeurIPS 2021): the shared
parameters stay fixed and only the user's own rows are fitted, on the loss the model
trains with (``train.loss`` with ``train.num-negatives`` sampled negatives per
positive, L2 ``train.l2`` on the rows), negatives redrawn each step among the items
outside their history. Nothing is sent.

Full-batch Adam on the user's rows (:data:`STEPS` steps at :data:`LR`, from the
training's initialisation): for MF with ``bce`` its gradient is written out in numpy
(milliseconds per user), otherwise (MF with ``bpr``, NeuMF) torch's autograd runs it.
Running to the exact optimum (Newton's method on the convex MF/bce loss) scored worse
on held-out users (docs/serving.md): the few Adam steps also keep the row small, as
the limited local training of trained-in rows does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from common.models import build_model, load_partial_state, private_state
from common.training import interaction_loss, sample_train_negatives
from serving import scoring

#: Adam steps and step size of a fold-in (measured in docs/serving.md).
STEPS = 60
LR = 0.05
INIT_STD = 0.1


def fold_in(
    kind: str,
    shared: Mapping[str, NDArray[np.float32]],
    histories: Sequence[NDArray[np.int64]],
    train: Mapping[str, Any],
    *,
    steps: int = STEPS,
    lr: float = LR,
    seed: int = 0,
) -> dict[str, NDArray[np.float32]]:
    """Private rows (one per history) fitted against the frozen ``shared`` model.

    ``histories[u]`` are catalogue rows user ``u`` interacted with; ``train`` holds
    ``loss`` (bce | bpr), ``l2`` and ``num-negatives`` (the run's ``train.*``).
    """
    if kind == "mf" and str(train.get("loss", "bce")) == "bce":
        return _adam_mf(shared, histories, train, seed=seed, steps=steps, lr=lr)
    dims = scoring.dims(kind, shared)
    num_users, num_items = len(histories), int(dims["num-items"])
    generator = torch.Generator().manual_seed(seed)
    model = build_model(
        kind,  # type: ignore[arg-type]
        num_users,
        num_items,
        int(dims["dim"]),
        tuple(dims.get("mlp-layers", (64, 32, 16))),  # type: ignore[arg-type]
    )
    load_partial_state(model, {k: torch.from_numpy(np.array(v)) for k, v in shared.items()}, private=False)
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("user_"))
        if name.startswith("user_"):
            with torch.no_grad():
                if name == "user_bias.weight":
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
            params.append(param)
    users = np.concatenate([np.full(len(h), u, dtype=np.int64) for u, h in enumerate(histories)])
    positives = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
    keys = np.unique(users * num_items + positives)
    weight = torch.from_numpy(1.0 / np.bincount(users, minlength=num_users)[users]).float()
    users_t = torch.from_numpy(users)
    rng = np.random.default_rng(seed)
    k = int(train.get("num-negatives", 4))
    loss_name, l2 = str(train.get("loss", "bce")), float(train.get("l2", 0.0))
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        negatives = sample_train_negatives(keys, users, k, num_items, rng)
        items = torch.from_numpy(np.concatenate([positives[:, None], negatives], axis=1))
        logits = model(users_t, items)
        per_sample = interaction_loss(logits, loss_name) + l2 * model.l2_terms(users_t, items)
        loss = (per_sample * weight).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.numpy().astype(np.float32) for k, v in private_state(model).items()}



def _adam_mf(
    shared: Mapping[str, NDArray[np.float32]],
    histories: Sequence[NDArray[np.int64]],
    train: Mapping[str, Any],
    *,
    seed: int,
    steps: int,
    lr: float,
) -> dict[str, NDArray[np.float32]]:
    """:func:`fold_in` for MF with ``bce``, its gradient written out in numpy (no autograd overhead).

    The same objective and optimiser as the torch path: mean over the user's positives
    of the BCE over the positive and its k fresh negatives, plus ``l2 ||p_u||²``; Adam
    (β = 0.9, 0.999, ε = 1e-8) from ``p_u ~ N(0, 0.1²)``, ``b_u = 0``.
    """
    q = shared["item_embedding.weight"].astype(np.float64)
    bi = shared["item_bias.weight"][:, 0].astype(np.float64) + float(shared["global_bias.value"][0])
    num_items, dim = q.shape
    k, l2 = int(train.get("num-negatives", 4)), float(train.get("l2", 0.0))
    rng = np.random.default_rng(seed)
    out_p = np.zeros((len(histories), dim), dtype=np.float32)
    out_b = np.zeros((len(histories), 1), dtype=np.float32)
    for u, history in enumerate(histories):
        pos = np.asarray(history, dtype=np.int64)
        keys = np.unique(pos)
        theta = np.r_[rng.normal(0.0, INIT_STD, dim), 0.0]  # (p_u, b_u)
        m, v = np.zeros(dim + 1), np.zeros(dim + 1)
        labels = np.zeros((len(pos), 1 + k))
        labels[:, 0] = 1.0
        for t in range(1, steps + 1):
            negatives = sample_train_negatives(keys, np.zeros(len(pos), np.int64), k, num_items, rng)
            items = np.concatenate([pos[:, None], negatives], axis=1)
            grad = mf_gradient(theta, q, bi, items, labels, l2)
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad**2
            theta -= lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        out_p[u], out_b[u, 0] = theta[:dim], theta[dim]
    return {"user_embedding.weight": out_p, "user_bias.weight": out_b}


def mf_gradient(
    theta: NDArray[np.float64],
    q: NDArray[np.float64],
    bi: NDArray[np.float64],
    items: NDArray[np.int64],
    labels: NDArray[np.float64],
    l2: float,
) -> NDArray[np.float64]:
    """Gradient in ``theta = (p_u, b_u)`` of the mean over rows of ``items`` (n, 1+k) of the BCE, + l2 ||p_u||²."""
    dim = q.shape[1]
    qi = q[items]  # (n, 1+k, D)
    logits = qi @ theta[:dim] + theta[dim] + bi[items]
    err = (1.0 / (1.0 + np.exp(-logits)) - labels) / len(items)
    return np.r_[np.einsum("nj,njd->d", err, qi) + 2.0 * l2 * theta[:dim], err.sum()]
