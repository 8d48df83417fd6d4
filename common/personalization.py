"""A silo's personalization: fine-tune a copy of the model on the silo's own users.

After (or between) federated rounds a silo may adapt the shared model to its users
(``personalize.*``): a copy of the model is trained on the silo's *training*
interactions for up to ``epochs`` epochs, and the silo keeps the epoch (0 = the
global model itself) whose validation HR@K over its own users is best. What the
fine-tune moves (``params``):

* ``item-bias``: MF's item biases only (the silo's own item popularity);
* ``items``: every shared parameter (item tables, biases, MLP tower, output layer);
* ``all``: the shared parameters and the users' own rows.

The copy never replaces the model a silo trains federated rounds on or sends: the
caller's model is not modified. Negatives are drawn, as in federated training,
among items outside each user's training set (:func:`common.training.train_epochs`),
so the held-out validation and test items never shape the fine-tune; the epoch is
selected on validation only, and test is measured on the selected copy.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.config import PersonalizeSettings, TrainSettings
from common.data.split import UserSplit
from common.evaluation import EvalProtocol, evaluation_sums
from common.models import Recommender, is_private
from common.training import train_epochs


@dataclass(frozen=True, slots=True)
class FineTuneResult:
    """What :func:`fine_tune` did: the selected copy and the curve it was selected on."""

    model: Recommender  # the personalized copy at the selected epoch
    epoch: int  # selected epoch (0 = no fine-tune was better on validation)
    val_hits: tuple[float, ...]  # validation hits@K of the silo's users after 0, 1, ... epochs
    train_loss: tuple[float, ...]  # mean training loss of fine-tune epochs 1, 2, ...


def tuned_parameters(model: nn.Module, params: str) -> list[str]:
    """Names of the parameters a fine-tune of kind ``params`` moves."""
    names = [name for name, _ in model.named_parameters()]
    if params == "item-bias":
        chosen = [n for n in names if n.startswith("item_bias.")]
    elif params == "items":
        chosen = [n for n in names if not is_private(n)]
    elif params == "all":
        chosen = names
    else:
        raise ValueError(f"personalize.params: unknown kind {params!r}; use item-bias, items or all")
    if not chosen:
        raise ValueError(f"personalize.params: {params!r} names no parameter of {type(model).__name__}")
    return chosen


def fine_tune(
    model: Recommender,
    split: UserSplit,
    settings: PersonalizeSettings,
    train: TrainSettings,
    *,
    k: int,
    rng: np.random.Generator,
    device: torch.device,
) -> FineTuneResult:
    """Fine-tune a copy of ``model`` on ``split``'s training interactions; select on validation.

    Each epoch is one pass of :func:`common.training.train_epochs` (``train``'s batch
    size, loss, negatives and L2) with one Adam optimizer at ``settings.lr`` over the
    parameters :func:`tuned_parameters` names; the others are frozen. After every
    epoch the copy's validation hits@``k`` (sampled protocol) are measured; the
    earliest epoch with the most hits is returned (epoch 0 when none beats the
    global model). ``model`` itself is not modified.
    """
    tuned = copy.deepcopy(model).to(device)
    moving = set(tuned_parameters(tuned, settings.params))
    for name, parameter in tuned.named_parameters():
        parameter.requires_grad_(name in moving)
    optimizer = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=settings.lr)
    train_settings = dataclasses.replace(train, lr=settings.lr)
    hits = [_val_hits(tuned, split, k, device)]
    best_state, best_epoch = copy.deepcopy(tuned.state_dict()), 0
    losses = []
    for epoch in range(1, settings.epochs + 1):
        if split.num_train == 0:
            break
        stats = train_epochs(tuned, split, train_settings, epochs=1, rng=rng, device=device, optimizer=optimizer)
        losses.append(stats.mean_loss)
        hits.append(_val_hits(tuned, split, k, device))
        if hits[-1] > hits[best_epoch]:
            best_state, best_epoch = copy.deepcopy(tuned.state_dict()), epoch
    tuned.load_state_dict(best_state)
    for parameter in tuned.parameters():
        parameter.requires_grad_(True)
    tuned.eval()
    return FineTuneResult(tuned, best_epoch, tuple(hits), tuple(losses))


def _val_hits(model: Recommender, split: UserSplit, k: int, device: torch.device) -> float:
    """Validation hits@k of ``split``'s users (the sampled protocol of the evaluation)."""
    sums = evaluation_sums(model, split, EvalProtocol(k=k, full_ranking=False), np.zeros(split.num_items), device)
    return float(sums[f"val-hits@{k}"])  # type: ignore[arg-type]
