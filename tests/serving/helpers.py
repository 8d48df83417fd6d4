"""A tiny finished simulation (in-process runtime) for the serving tests."""

from pathlib import Path

from common.run_config import load_default_run_config
from simulations.inprocess import InProcessGrid, run_inprocess

SMALL = {
    "num-server-rounds": 2,
    "data.synthetic.num-users": 200,
    "data.synthetic.num-items": 300,
    "model.dim": 8,
    "strategy.min-nodes": 2,
    "eval.full-ranking": False,
}


def finished_run(run_dir: Path, silos: int = 3, **extra) -> InProcessGrid:
    """Run a small simulation to the end in ``run_dir``; no state-root: silos use the run's default."""
    cfg = load_default_run_config()
    cfg.update({**SMALL, "run-dir": str(run_dir), **extra})
    return run_inprocess(cfg, silos)
