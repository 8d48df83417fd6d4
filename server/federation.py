"""One federated training run: the server side, independent of how the grid is provided."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from common import records
from common.config import AppConfig
from common.content import apply_item_init, model_for
from common.data import prepared
from common.data.pipeline import load_interactions
from common.evaluation import EvalProtocol
from common.models import shared_state
from common.privacy.accounting import Accountant
from common.privacy.events import DP_FEDAVG
from common.privacy.ledger import releases
from common.run_config import Scalar
from common.rundir import RunDir, default_run_dir
from common.seeding import derive_seed
from common.storage import atomic_write_json, load_arrays, save_arrays
from server.central_canaries import CanaryClients
from server.central_dp import ClientLevelDP
from server.ledger import RunLedgers
from server.loop import run_rounds
from server.metered_grid import MeteredGrid
from server.protocol import FedrecStrategy
from server.recorder import RunRecorder
from server.registry import registered_weights
from server.strategy import SharedModelFedAvg


def initial_shared_arrays(cfg: AppConfig, num_items: int) -> ArrayRecord:
    """Shared parameters of a freshly initialised model (seeded by the run seed)."""
    torch.manual_seed(derive_seed(cfg.seed, "server-init"))
    model = model_for(cfg, 1, num_items)
    apply_item_init(cfg, model)  # model.item-init: pretrained item embeddings as the initial table
    return ArrayRecord(torch_state_dict=shared_state(model))


def catalogue_size(cfg: AppConfig) -> int:
    """Items in the shared catalogue: from prepared silo data if ``data.path`` holds it.

    In a deployment the server needs only the catalogue's size; ``data.path`` may
    name a directory written by ``fedrec data prepare`` (or one silo's directory in
    it), so the server never loads interactions.
    """
    size = prepared.catalogue_size(Path(cfg.data.path)) if cfg.data.path else None
    return size if size is not None else load_interactions(cfg.data, cfg.seed).num_items


def build_strategy(cfg: AppConfig, ledgers: RunLedgers, resumed: bool, run_dir: Path | None = None) -> FedrecStrategy:
    """FedAvg (or a robust aggregator) of the shared model, wrapped in client-level DP when central DP is on."""
    if cfg.privacy.mode == "distributed":  # user-level DP over all silos through secure aggregation
        from server.distributed import STATE_FILE, DistributedDP

        return DistributedDP(cfg, ledgers, None if run_dir is None else run_dir / STATE_FILE, resumed)
    protocol = EvalProtocol(
        k=cfg.eval.k,
        full_ranking=cfg.eval.full_ranking,
        full_ranking_k=cfg.eval.full_ranking_k,
        personalized=cfg.personalize.enabled,
    )
    inner_settings = cfg.strategy
    if cfg.privacy.is_central or cfg.audit.canaries:
        # Central DP's bound on each silo's influence is its clip S, the same for every
        # silo; defences that look at the other silos (an adaptive norm bound, rejecting
        # opposed updates, weights) would make one silo's presence change another's
        # contribution, beyond the sensitivity the noise is calibrated to. An audit run
        # keeps the canary silo's update whole for the same reason: it is what is measured.
        inner_settings = dataclasses.replace(cfg.strategy, norm_action="none", reject_opposed=False, cap_weights=False)
    strategy = SharedModelFedAvg(
        inner_settings,
        cfg.eval.k,
        ledgers=ledgers,
        registry=lambda nodes: registered_weights(cfg, nodes),
        protocol=protocol,
    )
    if not cfg.privacy.is_central:
        return strategy
    accountant = None
    if resumed:  # every recorded release counts, also one of an interrupted round
        spent = [r for r in releases(ledgers.server.chain) if r.kind == DP_FEDAVG]
        accountant = Accountant.from_releases(spent, steps_per_round=1) if spent else None
    canaries = cfg.audit.central_canaries
    return ClientLevelDP(
        strategy,
        cfg.privacy,
        cfg.num_server_rounds,
        canaries=CanaryClients(canaries, derive_seed(cfg.audit.seed, "central-canaries")) if canaries else None,
        disable_noise=cfg.audit.unsafe_disable_noise,
        accountant=accountant,
        aggregator=cfg.strategy.aggregator,
        trim_fraction=cfg.strategy.trim_fraction,
    )


def run_federation(grid: Grid, run_config: Mapping[str, Scalar]) -> Path:
    """Run ``num-server-rounds`` rounds of FedAvg over the shared model on ``grid``.

    Writes the run directory (config, per-round metrics and checkpoints, ledgers,
    final model, report) and returns its path. With ``resume`` it continues the run
    in ``run-dir`` after its last completed round: shared model from that round's
    checkpoint, privacy history from the ledgers, silos' state from their disks.
    """
    cfg = AppConfig.from_run_config(run_config)
    run_dir = RunDir((Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.data.dataset)).resolve())
    recorder = RunRecorder(run_dir)
    if cfg.resume:
        point = recorder.resume(run_config)
        pending = point.pending  # eval.fused: trained, its evaluation still to come
        arrays, first_round = point.arrays, (point.last_round if pending is None else pending.server_round) + 1
        initial = load_arrays(run_dir.initial_model)
        log(INFO, "fedrec resumes %s after round %d", run_dir.path, point.last_round)
    else:
        recorder.start(run_config)
        # Audit canary items (if any) extend the catalogue after the real items.
        num_items = catalogue_size(cfg) + cfg.audit.canaries
        initial = arrays = initial_shared_arrays(cfg, num_items)
        save_arrays(run_dir.initial_model, initial)
        first_round, pending = 1, None
        log(INFO, "fedrec run directory: %s", run_dir.path)
    assert recorder.ledgers is not None  # set by start() and resume()
    strategy = build_strategy(cfg, recorder.ledgers, cfg.resume, run_dir.path)
    final = arrays
    fused = cfg.eval.fused and cfg.privacy.mode != "distributed"  # distributed DP: its own phases
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
            on_release=recorder.record_release,
            privacy_mode=cfg.privacy.mode,
            fused=fused,
            on_trained=recorder.record_trained,
            pending=pending,
            config=ConfigRecord({records.RUN_UID: recorder.run_uid, records.RUN_DIR: str(run_dir.path)}),
        )
    if isinstance(strategy, ClientLevelDP) and strategy.canaries is not None:
        atomic_write_json(run_dir.central_canaries, strategy.canaries.cosines(initial, final))
    recorder.finish(final, cfg.eval.k, cfg.privacy.mode, strategy.stop_reason)
    log(INFO, "fedrec run finished; report: %s", run_dir.report)
    return run_dir.path
