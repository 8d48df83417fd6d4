"""The run config a command runs with: defaults, named options, ``-c`` overrides.

Every command builds the final flat run config first and parses it once
(:meth:`AppConfig.from_run_config`); :func:`preflight` then loads and partitions the
data, so bad input fails before anything starts.
"""

from __future__ import annotations

from common.config import AppConfig
from common.errors import ConfigError
from common.run_config import Scalar, collect_overrides, load_default_run_config, merge_overrides


def resolve_config(
    overrides: list[str] | None, **named: Scalar | None
) -> tuple[dict[str, Scalar], AppConfig]:
    """Defaults + named options + ``-c`` overrides, parsed and validated."""
    run_config = merge_overrides(load_default_run_config(), collect_overrides(overrides, named))
    return run_config, AppConfig.from_run_config(run_config)


def preflight(cfg: AppConfig, silos: int | None) -> int:
    """Load and partition the data once before launching; return the client count."""
    from common.data.pipeline import load_interactions, partition, split_interactions

    if silos is not None and silos < 1:
        raise ConfigError(f"--silos must be >= 1, got {silos}")
    interactions = load_interactions(cfg.data, cfg.seed)
    data = split_interactions(cfg.data, cfg.seed, interactions)
    if silos is not None:
        num_clients = silos
    elif cfg.data.partition == "by-user":
        num_clients = data.split.num_users
    else:
        num_clients = 5
    partition(cfg.data, cfg.seed, data, interactions, num_clients)
    if num_clients < cfg.strategy.min_nodes:
        raise ConfigError(
            f"strategy.min-nodes is {cfg.strategy.min_nodes} but only {num_clients} clients run"
        )
    return num_clients
