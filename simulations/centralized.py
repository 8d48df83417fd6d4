"""Centralized baseline: the same model, split and metrics on the pooled data.

Every federated number has a side-by-side reference trained without federation;
it also offers the popularity ranking, the floor any personalised model must beat.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from common.config import AppConfig
from common.content import apply_item_init, model_for
from common.data.pipeline import load_interactions, split_interactions
from common.data.silo import SiloData
from common.errors import ConfigError
from common.evaluation import EvalProtocol, evaluation_sums, summarize
from common.seeding import derive_seed, numpy_rng
from common.training import train_epochs


class Popularity(nn.Module):
    """Ranks items by training popularity for every user (a non-personalised floor)."""

    def __init__(self, popularity: np.ndarray) -> None:
        super().__init__()
        self.score: Tensor
        self.register_buffer("score", torch.as_tensor(popularity, dtype=torch.float64))

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """Popularity of ``items`` (B, T)."""
        return self.score[items]

    def score_all(self, users: Tensor) -> Tensor:
        """Popularity of every item, repeated per user (B, I)."""
        return self.score.expand(len(users), -1)


@dataclass(frozen=True, slots=True)
class EpochResult:
    """Metrics after one epoch of centralized training."""

    epoch: int
    loss: float
    seconds: float
    metrics: dict[str, float]


def run_centralized(
    cfg: AppConfig,
    epochs: int,
    *,
    model_name: str | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    evaluate_every: int = 1,
    on_trained: Callable[[nn.Module, SiloData], None] | None = None,
) -> list[EpochResult]:
    """Train ``cfg.model`` (or ``popularity``) on all users pooled; evaluate each epoch.

    With ``evaluate_every`` N only every N-th epoch and the last are evaluated (the
    others' metrics are empty); ``on_trained`` gets the trained model and the data.

    Raises
    ------
    ConfigError
        If ``epochs`` is below 1 (before any data is loaded).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
    data: SiloData = split_interactions(cfg.data, cfg.seed, load_interactions(cfg.data, cfg.seed))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    protocol = EvalProtocol(cfg.eval.k, cfg.eval.full_ranking, cfg.eval.full_ranking_k)
    name = model_name or cfg.model.name
    results: list[EpochResult] = []
    if name == "popularity":
        model: nn.Module = Popularity(data.item_popularity)
        sums = evaluation_sums(model, data.split, protocol, data.item_popularity, device)  # type: ignore[arg-type]
        results.append(EpochResult(0, float("nan"), 0.0, summarize(sums, cfg.eval.k)))
        if on_epoch:
            on_epoch(results[-1])
        return results
    torch.manual_seed(derive_seed(cfg.seed, "centralized-init"))
    model = model_for(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=name)),  # type: ignore[arg-type]
                      data.split.num_users, data.split.num_items)
    apply_item_init(cfg, model)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        stats = train_epochs(
            model,
            data.split,
            cfg.train,
            epochs=1,
            rng=numpy_rng(cfg.seed, "centralized", epoch),
            device=device,
            optimizer=optimizer,
        )
        metrics: dict[str, float] = {}
        if epoch % evaluate_every == 0 or epoch == epochs:
            sums = evaluation_sums(model, data.split, protocol, data.item_popularity, device)  # type: ignore[arg-type]
            metrics = summarize(sums, cfg.eval.k)
        result = EpochResult(epoch, stats.mean_loss, time.perf_counter() - start, metrics)
        results.append(result)
        if on_epoch:
            on_epoch(result)
    if on_trained:
        on_trained(model.cpu(), data)
    return results


def best_epoch(results: list[EpochResult], k: int) -> EpochResult:
    """The evaluated epoch with the highest validation HR@K (the one to report test for)."""
    return max((r for r in results if r.metrics), key=lambda r: r.metrics[f"val-hr@{k}"])
