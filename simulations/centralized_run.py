"""``fedrec centralized``'s run directory: the same layout as a simulation's.

``config.json``, ``metrics.jsonl`` (one round record per epoch: ``round`` = epoch),
``final.npz`` (the shared part of the trained model; no ``initial.npz`` or per-epoch checkpoints),
``report.md`` and ``metrics.png`` are written by the simulation's own
:class:`server.recorder.RunRecorder`; every user's private rows go where a simulation
keeps a silo's: ``silos/silo-0/<run-uid>/user-params.npz`` with a ``silo.json`` that
marks them as the pooled users (``fedrec recommend`` reads it). ``summary.json`` holds
the best validation epoch.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ArrayRecord
from torch import nn

from common.config import AppConfig
from common.data.silo import SiloData
from common.models import private_state, shared_state
from common.round_record import RoundRecord
from common.rundir import RunDir
from common.storage import atomic_write_json, save_arrays
from server.recorder import RunRecorder
from simulations.centralized import EpochResult, best_epoch, run_centralized


def run_centralized_dir(
    run: RunDir,
    run_config: Mapping[str, Any],
    cfg: AppConfig,
    epochs: int,
    *,
    model_name: str | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> dict[str, Any]:
    """Train on the pooled data, write ``run`` like a simulation's directory; return the summary."""
    name = model_name or cfg.model.name
    recorder = RunRecorder(run)
    recorder.start({**run_config, "run-dir": str(run.path)})
    empty = ArrayRecord()

    def record(result: EpochResult) -> None:
        r = RoundRecord(
            server_round=result.epoch,
            seconds=result.seconds,
            train={} if name == "popularity" else {"train-loss": result.loss},
            evaluate=result.metrics,
            bytes_sent=0,
            bytes_received=0,
            missing_nodes=(),
            rejected=(),
        )
        recorder.record_round(r, empty)
        if on_epoch:
            on_epoch(result)

    final = {"arrays": empty}

    def keep(model: nn.Module, data: SiloData) -> None:
        final["arrays"] = ArrayRecord(torch_state_dict=shared_state(model))
        store = run.silo_states / "silo-0" / recorder.run_uid
        store.mkdir(parents=True, exist_ok=True)
        save_arrays(store / "user-params.npz", ArrayRecord(torch_state_dict=private_state(model)))
        atomic_write_json(
            store / "silo.json",
            {
                "pooled": True,
                "partition-id": 0,
                "num-partitions": 1,
                "data-path": cfg.data.path,
                "run-uid": recorder.run_uid,
                "seed": cfg.seed,
                "data": dataclasses.asdict(cfg.data),
                "model": {**dataclasses.asdict(cfg.model), "name": name},
                "train": {"loss": cfg.train.loss, "l2": cfg.train.l2, "num-negatives": cfg.train.num_negatives},
                "privacy-mode": "none",
            },
        )

    results = run_centralized(
        cfg, epochs, model_name=name, on_epoch=record, evaluate_every=cfg.eval.every, on_trained=keep
    )
    recorder.finish(final["arrays"], cfg.eval.k)
    shutil.rmtree(run.checkpoints, ignore_errors=True)  # the recorder's per-epoch files hold no model here
    best = best_epoch(results, cfg.eval.k) if name != "popularity" else results[-1]
    summary = {"model": name, "best-epoch": best.epoch, **best.metrics}
    atomic_write_json(run.summary, summary)
    return summary
