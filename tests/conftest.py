"""Shared fixtures."""

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from common.run_config import load_default_run_config

REPO = Path(__file__).resolve().parents[1]

# σ calibrations are cached on disk (common.privacy.calibration_cache): tests (and the
# simulations they start) use a fresh directory of their own, never the user's cache.
os.environ["FEDREC_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedrec-test-cache-")


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Server-side Messages need a task identity outside Flower's runtime."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def small_run_config(tmp_path: Path) -> dict[str, bool | int | float | str]:
    """Defaults from pyproject.toml with a small synthetic data set and short rounds."""
    cfg = load_default_run_config()
    cfg.update(
        {
            "num-server-rounds": 3,
            "run-dir": str(tmp_path / "run"),
            "data.synthetic.num-users": 300,
            "data.synthetic.num-items": 300,
            "data.synthetic.mean-interactions": 20,
            "model.dim": 16,
            "train.lr": 0.01,
            "eval.full-ranking-k": 20,
        }
    )
    return cfg
