"""A silo's data: loaded once per node and kept in node state; audit canaries added."""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.app import Context
from flwr.supercore import log

from client import state
from common.config import AppConfig, NodeConfig
from common.data.pipeline import silo_data as load_silo_data
from common.data.silo import SiloData
from common.privacy import canaries


def silo_data(cfg: AppConfig, node: NodeConfig, context: Context) -> SiloData:
    """The silo's data: from node state, else loaded once and kept there.

    With ``audit.canaries`` the catalogue gets the canary items, and the audited
    silo its included canary users (see :mod:`common.privacy.canaries`).
    """
    data = state.load_silo_data(context.state)
    if data is None:
        data = load_silo_data(cfg.data, cfg.seed, node.partition_id, node.num_partitions, node.data_path)
        if cfg.audit.canaries:
            data = with_canaries(cfg, node, data)
        state.save_silo_data(context.state, data)
    return data


def with_canaries(cfg: AppConfig, node: NodeConfig, data: SiloData) -> SiloData:
    """``data`` with the audit's canary items (every silo) and canary users (audited silo)."""
    plan = canaries.canary_plan(cfg.audit, data.split.num_items)
    split = canaries.with_canary_items(data.split, plan.count)
    if node.partition_id == cfg.audit.canary_silo:
        split = canaries.with_canary_users(split, plan)
        log(
            INFO, "silo %d trains with %d of %d audit canaries",
            node.partition_id, int(plan.included.sum()), plan.count,
        )
    popularity = np.concatenate([data.item_popularity, np.zeros(plan.count)])
    return SiloData(split, popularity)
