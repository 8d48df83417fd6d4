"""One federated training run: the server side, independent of how the grid is provided."""

from __future__ import annotations

import json
from collections.abc import Mapping
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from common import records
from common.config import AppConfig, Scalar
from common.data.pipeline import load_interactions
from common.errors import DataError
from common.models import build_model, shared_state
from common.seeding import derive_seed
from common.storage import atomic_write_json, load_arrays, save_arrays
from server.central_dp import ClientLevelDP
from server.loop import run_rounds
from server.metered_grid import MeteredGrid
from server.reporting import (
    CENTRAL_CANARIES,
    INITIAL_CHECKPOINT,
    REPORT_FILE,
    RunRecorder,
    default_run_dir,
)
from server.strategy import SharedModelFedAvg


def initial_shared_arrays(cfg: AppConfig, num_items: int) -> ArrayRecord:
    """Shared parameters of a freshly initialised model (seeded by the run seed)."""
    torch.manual_seed(derive_seed(cfg.seed, "server-init"))
    model = build_model(cfg.model.name, 1, num_items, cfg.model.dim, cfg.model.mlp_layers)
    return ArrayRecord(torch_state_dict=shared_state(model))


def catalogue_size(cfg: AppConfig) -> int:
    """Items in the shared catalogue: from prepared silo data if ``data.path`` holds it.

    In a deployment the server needs only the catalogue's size; ``data.path`` may
    name a directory written by ``fedrec data prepare`` (or one silo's directory in
    it), so the server never loads interactions.
    """
    path = Path(cfg.data.path) if cfg.data.path else None
    if path is not None and path.is_dir():
        for manifest in (path / "silo.json", *sorted(path.glob("silo-*/silo.json"))[:1]):
            if manifest.is_file():
                try:
                    return int(json.loads(manifest.read_text())["counts"]["items"])
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise DataError(f"{manifest}: cannot read the catalogue size ({exc})") from None
    return load_interactions(cfg.data, cfg.seed).num_items


def run_federation(grid: Grid, run_config: Mapping[str, Scalar]) -> Path:
    """Run ``num-server-rounds`` rounds of FedAvg over the shared model on ``grid``.

    Writes the run directory (config, per-round metrics and checkpoints, ledgers,
    final model, report) and returns its path. With ``resume`` it continues the run
    in ``run-dir`` after its last completed round: shared model from that round's
    checkpoint, privacy history from the ledgers, silos' state from their disks.
    """
    cfg = AppConfig.from_run_config(run_config)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.data.dataset)
    recorder = RunRecorder(run_dir.resolve())
    if cfg.resume:
        point = recorder.resume(run_config)
        arrays, first_round = point.arrays, point.last_round + 1
        initial = load_arrays(recorder.run_dir / INITIAL_CHECKPOINT)
        log(INFO, "fedrec resumes %s after round %d", recorder.run_dir, point.last_round)
    else:
        recorder.start(run_config)
        # Audit canary items (if any) extend the catalogue after the real items.
        num_items = catalogue_size(cfg) + cfg.audit.canaries
        initial = arrays = initial_shared_arrays(cfg, num_items)
        save_arrays(recorder.run_dir / INITIAL_CHECKPOINT, initial)
        first_round = 1
        log(INFO, "fedrec run directory: %s", recorder.run_dir)

    strategy: SharedModelFedAvg | ClientLevelDP = SharedModelFedAvg(
        cfg.strategy, cfg.eval.k, ledgers=recorder.ledgers
    )
    if cfg.privacy.is_central:
        strategy = ClientLevelDP(
            strategy, cfg.privacy, cfg.num_server_rounds,
            canaries=cfg.audit.central_canaries,
            canary_seed=derive_seed(cfg.audit.seed, "central-canaries"),
            disable_noise=cfg.audit.unsafe_disable_noise,
        )
    if cfg.resume:
        strategy.restore(recorder.rounds)
    final = arrays
    if first_round <= cfg.num_server_rounds and not strategy.stop_reason:
        final = run_rounds(
            strategy,
            MeteredGrid(grid),
            arrays,
            first_round=first_round,
            last_round=cfg.num_server_rounds,
            timeout=cfg.strategy.timeout,
            evaluate_every=cfg.eval.every,
            on_round_end=recorder.record_round,
            config=ConfigRecord({records.RUN_UID: recorder.run_uid}),
        )
    if isinstance(strategy, ClientLevelDP) and strategy.canaries:
        atomic_write_json(recorder.run_dir / CENTRAL_CANARIES, strategy.canary_cosines(initial, final))
    recorder.finish(final, cfg.eval.k, cfg.privacy.mode, strategy.stop_reason)
    log(INFO, "fedrec run finished; report: %s", recorder.run_dir / REPORT_FILE)
    return recorder.run_dir
