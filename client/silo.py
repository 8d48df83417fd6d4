"""One silo's round: build the model, train locally, evaluate its own users.

No Flower imports: the ClientApp handlers translate messages to these calls.
"""

from __future__ import annotations

import torch

from common.config import AppConfig
from common.content import model_for
from common.data.silo import SiloData
from common.evaluation import EvalProtocol, SumValue, evaluation_sums
from common.models import Recommender, load_partial_state
from common.seeding import derive_seed, numpy_rng
from common.training import TrainStats, train_epochs


def device() -> torch.device:
    """CUDA when available, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def new_model(cfg: AppConfig, data: SiloData, partition_id: int) -> Recommender:
    """A model sized for this silo, user rows initialised from (seed, silo)."""
    torch.manual_seed(derive_seed(cfg.seed, "user-init", partition_id))
    return model_for(cfg, data.split.num_users, data.split.num_items)


def load_shared(model: Recommender, shared: dict[str, torch.Tensor]) -> None:
    """Load the server's shared parameters; a mismatch is a protocol error."""
    load_partial_state(model, shared, private=False)


def train_round(
    model: Recommender,
    cfg: AppConfig,
    data: SiloData,
    partition_id: int,
    server_round: int,
) -> TrainStats:
    """Train this silo's users for ``train.local-epochs`` epochs."""
    rng = numpy_rng(cfg.seed, "train", partition_id, server_round)
    torch.manual_seed(derive_seed(cfg.seed, "train-torch", partition_id, server_round))
    dev = device()
    model.to(dev)
    stats = train_epochs(
        model, data.split, cfg.train, epochs=cfg.train.local_epochs, rng=rng, device=dev
    )
    model.cpu()
    return stats


def evaluate_users(model: Recommender, cfg: AppConfig, data: SiloData) -> dict[str, SumValue]:
    """Evaluation sums of this silo's users (validation and test items)."""
    dev = device()
    sums = evaluation_sums(model.to(dev), data.split, eval_protocol(cfg), data.item_popularity, dev)
    model.cpu()
    return sums


def eval_protocol(cfg: AppConfig) -> EvalProtocol:
    """The run's evaluation protocol (the same validation users every round)."""
    return EvalProtocol(
        k=cfg.eval.k,
        full_ranking=cfg.eval.full_ranking,
        full_ranking_k=cfg.eval.full_ranking_k,
        memory_mb=cfg.eval.memory_mb,
        val_users=cfg.eval.val_users,
        val_seed=derive_seed(cfg.seed, "val-users"),
    )
