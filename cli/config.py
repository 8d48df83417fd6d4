"""The run config a command runs with: defaults, named options, ``-c`` overrides.

Every command builds the final flat run config first and parses it once
(:meth:`AppConfig.from_run_config`); :func:`preflight` then loads and partitions the
data, so bad input fails before anything starts.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path

from common.config import AppConfig
from common.errors import ConfigError
from common.run_config import Scalar, flatten, load_default_run_config, merge_overrides, parse_override


def collect_overrides(overrides: list[str] | None, named: Mapping[str, Scalar | None]) -> dict[str, Scalar]:
    """Named options, then ``-c`` overrides in order (a later one wins); ``data.path`` made absolute.

    Each ``-c`` is ``key=value`` or a TOML file of overrides. Named options that are
    ``None`` (not given) are left out.
    """
    values: dict[str, Scalar] = {k: v for k, v in named.items() if v is not None}
    for text in overrides or []:
        if text.endswith(".toml") and "=" not in text:
            values.update(load_override_file(Path(text)))
        else:
            key, value = parse_override(text)
            values[key] = value
    if isinstance(values.get("data.path"), str) and values["data.path"]:
        values["data.path"] = str(Path(str(values["data.path"])).expanduser().resolve())
    return values


def resolve_config(
    overrides: list[str] | None, **named: Scalar | None
) -> tuple[dict[str, Scalar], AppConfig]:
    """Defaults + named options + ``-c`` overrides, parsed and validated."""
    run_config = merge_overrides(load_default_run_config(), collect_overrides(overrides, named))
    return run_config, AppConfig.from_run_config(run_config)


def load_override_file(path: Path) -> dict[str, Scalar]:
    """Overrides from a TOML file (nested tables or dotted keys), as ``flwr run -c`` takes."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return flatten(table)


def preflight(cfg: AppConfig, silos: int | None) -> int:
    """Load and partition the data once before launching; return the client count."""
    from common.data.partition import partition_users
    from common.data.pipeline import load_interactions, split_interactions
    from common.seeding import derive_seed

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
    partition_users(
        data.split,
        scheme=cfg.data.partition,
        num_partitions=num_clients,
        seed=derive_seed(cfg.seed, "partition"),
        skew=cfg.data.skew,
        alpha=cfg.data.dirichlet_alpha,
        item_category=interactions.item_category,
    )
    if num_clients < cfg.strategy.min_nodes:
        raise ConfigError(
            f"strategy.min-nodes is {cfg.strategy.min_nodes} but only {num_clients} clients run"
        )
    return num_clients
