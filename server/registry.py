"""What the server knows about each silo before round 1: the largest weight it may claim.

A silo's FedAvg weight is its count of training interactions (no local DP) or its
population of privacy units (local DP, unit user or interaction). A silo claiming
more than it has would take over the average, so the server caps every claim at
the silo's *registered* weight: from the manifests of prepared silo data
(``fedrec data prepare``) when ``data.path`` names them, else — in a simulation,
where the server can read the data — from the same split and partition the silos
make. ``strategy.max-weight`` > 0 caps every silo explicitly.
"""

from __future__ import annotations

from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.supercore import log

from common.config import AppConfig
from common.data import prepared
from common.data.pipeline import load_interactions, partition, split_interactions
from common.errors import DataError


def registered_weights(cfg: AppConfig, num_partitions: int) -> dict[int, int]:
    """Partition id → the largest FedAvg weight that silo may claim ({} when unknown)."""
    unit = "users" if cfg.privacy.is_local and cfg.privacy.local.unit == "user" else "train-interactions"
    path = Path(cfg.data.path) if cfg.data.path else None
    if path is not None and path.is_dir():
        counts = prepared.silo_counts(path)
        if counts is not None:
            return {pid: c[unit] for pid, c in counts.items()}
        if prepared.is_prepared_silo(path):
            log(WARNING, "data.path names one prepared silo: silos' weights are capped only by strategy.max-weight")
            return {}
    if num_partitions < 1:
        return {}
    try:
        interactions = load_interactions(cfg.data, cfg.seed)
    except DataError as exc:  # e.g. a deployment server without the data
        log(WARNING, "silos' weights are capped only by strategy.max-weight: %s", exc)
        return {}
    pooled = split_interactions(cfg.data, cfg.seed, interactions)
    k = cfg.simulation.clients_per_node
    if k > 1:  # packed by-user clients: node p hosts users p·k .. p·k + k − 1 (client.packed); no local DP
        per_user = pooled.split.train_counts()
        return {pid: int(per_user[pid * k : (pid + 1) * k].sum()) for pid in range(num_partitions)}
    parts = partition(cfg.data, cfg.seed, pooled, interactions, num_partitions)
    out = {}
    for pid, users in enumerate(parts):
        if unit == "users":
            out[pid] = len(users)
        else:
            out[pid] = int(np.isin(pooled.split.train_user, users).sum())
    return out
