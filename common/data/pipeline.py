"""From settings to one silo's data: load, split by time, partition, take a silo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from common.config import DataSettings
from common.data import prepared
from common.data.datasets import load_dataset
from common.data.partition import partition_users
from common.data.schema import Interactions
from common.data.silo import SiloData, pooled_split
from common.data.synthetic import SyntheticSpec, generate_synthetic
from common.seeding import derive_seed


def load_interactions(data: DataSettings, seed: int, path: str = "") -> Interactions:
    """Load the configured data set (``path`` overrides ``data.path``).

    A ``csv`` log is read with ``data.sep`` and ``data.header``; ``data.timestamp-col``
    ``""`` loads a log without time, which the split then orders at random.
    """
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
        **({"sep": data.sep, "header": data.header} if data.dataset == "csv" else {}),
    )


def split_interactions(data: DataSettings, seed: int, interactions: Interactions) -> SiloData:
    """Leave-one-out split of all users, with the catalogue's popularity."""
    return pooled_split(interactions, eval_negatives=data.eval_negatives, seed=seed)


def silo_data(
    data: DataSettings, seed: int, partition_id: int, num_partitions: int, path: str = ""
) -> SiloData:
    """Return the data of silo ``partition_id`` of ``num_partitions``.

    If ``path`` (or else ``data.path``) is a directory written by ``fedrec data
    prepare`` (it holds ``silo.json``), the silo's prepared files are loaded and
    must be silo ``partition_id`` of ``num_partitions``; ``data.dataset`` and the
    split settings are then those recorded at prepare time. Otherwise (simulation)
    the whole data set is loaded, split and partitioned, and this silo's part kept.

    Raises
    ------
    DataError
        If the data is malformed, or a prepared silo is another silo than
        ``partition_id`` of ``num_partitions``.
    """
    where = path or data.path
    if where and Path(where).is_dir():
        if prepared.is_prepared_silo(Path(where)):
            return prepared.load_prepared_silo(
                Path(where),
                partition_id=partition_id,
                num_partitions=num_partitions,
                seed=seed,
                eval_negatives=data.eval_negatives,
            )
        prepared.reject_prepared_root(Path(where), partition_id)
    interactions = load_interactions(data, seed, path)
    pooled = split_interactions(data, seed, interactions)
    parts = partition(data, seed, pooled, interactions, num_partitions)
    return SiloData(pooled.split.subset(parts[partition_id]), pooled.item_popularity)


def partition(
    data: DataSettings, seed: int, pooled: SiloData, interactions: Interactions, num_partitions: int
) -> list[NDArray[np.int64]]:
    """The users of each of ``num_partitions`` silos: the one partition simulation, the CLI and the server share."""
    return partition_users(
        pooled.split,
        scheme=data.partition,
        num_partitions=num_partitions,
        seed=derive_seed(seed, "partition"),
        skew=data.skew,
        alpha=data.dirichlet_alpha,
        item_category=interactions.item_category,
    )
