"""Inputs shared by the tests of the prepared-silo writer and reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.config import AppConfig, DataSettings
from common.data.prepare import prepare_silos
from common.data.silo import SiloData
from common.data.synthetic import SyntheticSpec, generate_synthetic
from common.run_config import load_default_run_config

SEED = 7
NEGATIVES = 20
PLATFORMS = ("gamma", "alpha", "beta")  # sorted: alpha=0, beta=1, gamma=2


def write_log_csv(path: Path) -> Path:
    """Write a synthetic log as CSV, with a platform per user and two short users."""
    data = generate_synthetic(
        SyntheticSpec(num_users=150, num_items=200, mean_interactions=12, seed=5)
    )
    frame = pd.DataFrame(
        {
            "user_id": data.user_ids[data.user_idx],
            "item_id": data.item_ids[data.item_idx],
            "timestamp": data.timestamp,
            "platform": [PLATFORMS[u % 3] for u in data.user_idx],
        }
    )
    short = pd.DataFrame(  # users with < 3 interactions have no held-out items
        {
            "user_id": ["short-1", "short-2", "short-2"],
            "item_id": list(frame["item_id"][:3]),
            "timestamp": [1, 2, 3],
            "platform": ["beta", "gamma", "gamma"],
        }
    )
    pd.concat([frame, short]).to_csv(path, index=False)
    return path


def csv_settings(path: Path, **overrides: str | int | float) -> DataSettings:
    """Default data settings for the CSV log at ``path``, with ``overrides``."""
    run_config = load_default_run_config()
    run_config.update({"data.dataset": "csv", "data.path": str(path)})
    run_config.update({"data.eval-negatives": NEGATIVES})
    run_config.update({f"data.{k}": v for k, v in overrides.items()})
    return AppConfig.from_run_config(run_config).data


def assert_same_data(a: SiloData, b: SiloData) -> None:
    """Assert that two silos' splits and item popularity are identical."""
    for name in (
        "train_user",
        "train_item",
        "val_item",
        "test_item",
        "val_negatives",
        "test_negatives",
        "user_global_idx",
    ):
        x, y = getattr(a.split, name), getattr(b.split, name)
        assert x.dtype == y.dtype == np.int64, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.split.num_items == b.split.num_items
    np.testing.assert_array_equal(a.item_popularity, b.item_popularity)


def prepare_csv(log: Path, out: Path, **kw: object) -> None:
    """Prepare the CSV ``log`` into ``out`` (4 silos by seed unless ``kw`` says)."""
    args: dict[str, object] = {"seed": SEED, "eval_negatives": NEGATIVES, **kw}
    if "silo_column" not in args:
        args.setdefault("num_silos", 4)
    prepare_silos("csv", log, out, **args)  # type: ignore[arg-type]
