"""Fold-in: fit new users' private rows from their interactions against the frozen shared model.

In the spirit of Federated Reconstruction (Singhal et al., NeurIPS 2021): the shared
parameters stay fixed and only the user's own rows are fitted, on the loss the model
trains with (``train.loss`` with ``train.num-negatives`` sampled negatives per
positive, L2 ``train.l2`` on the rows): full-batch Adam over the user's positives,
negatives redrawn each step among the items outside their history. Nothing is sent.
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

#: Adam steps and step size of a fold-in (fixed: measured in docs/serving.md).
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
