"""From settings to one silo's data: load, split by time, partition, take a silo."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from common.config import DataSettings
from common.data.loaders import load_dataset
from common.data.partition import partition_users
from common.data.schema import Interactions
from common.data.split import UserSplit, leave_one_out
from common.data.synthetic import SyntheticSpec, generate_synthetic
from common.seeding import derive_seed


@dataclass(frozen=True, slots=True)
class SiloData:
    """Everything one silo trains and evaluates on.

    ``item_popularity`` (training interactions per item divided by the number of
    users, over all silos) is a public catalogue statistic used only for the
    popularity-bias metric.
    """

    split: UserSplit
    item_popularity: NDArray[np.float64]


def load_interactions(data: DataSettings, seed: int, path: str = "") -> Interactions:
    """Load the configured data set (``path`` overrides ``data.path``)."""
    if data.dataset == "synthetic":
        s = data.synthetic
        spec = SyntheticSpec(
            num_users=s.num_users,
            num_items=s.num_items,
            dim=s.dim,
            num_categories=s.num_categories,
            mean_interactions=s.mean_interactions,
            seed=derive_seed(seed, "synthetic"),
        )
        return generate_synthetic(spec)
    return load_dataset(
        data.dataset,
        Path(path or data.path),
        user_col=data.user_col,
        item_col=data.item_col,
        timestamp_col=data.timestamp_col,
    )


def split_interactions(data: DataSettings, seed: int, interactions: Interactions) -> SiloData:
    """Leave-one-out split of all users, with the catalogue's popularity."""
    split = leave_one_out(
        interactions, num_negatives=data.eval_negatives, seed=derive_seed(seed, "split")
    )
    counts = np.bincount(split.train_item, minlength=split.num_items)
    return SiloData(split, counts / split.num_users)


def silo_data(
    data: DataSettings, seed: int, partition_id: int, num_partitions: int, path: str = ""
) -> SiloData:
    """The data of silo ``partition_id`` of ``num_partitions`` (simulation)."""
    interactions = load_interactions(data, seed, path)
    pooled = split_interactions(data, seed, interactions)
    parts = partition_users(
        pooled.split,
        scheme=data.partition,
        num_partitions=num_partitions,
        seed=derive_seed(seed, "partition"),
        skew=data.skew,
        alpha=data.dirichlet_alpha,
        item_category=interactions.item_category,
    )
    return SiloData(pooled.split.subset(parts[partition_id]), pooled.item_popularity)
