"""One message of a silo: restore its state, train or evaluate, build the reply content.

The ClientApp handlers (:mod:`client.app`) call :func:`open_session` and then
:func:`train` or :func:`evaluate`; everything here works on a Flower ``Context``
and ``RecordDict`` but knows nothing of how messages travel.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.supercore import log

from client import silo, state
from client.data import silo_data
from client.durable import SiloStore, StateError, fingerprint
from client.session import Session
from common import records
from common.config import AppConfig, NodeConfig
from common.models import Recommender, shared_state
from common.privacy import release
from common.training import TrainStats

SILO_REPORT = "silo-report.jsonl"  # in the silo's state dir: what the release policy keeps in the silo


def open_session(content: RecordDict, context: Context) -> Session:
    """Parse settings, restore durable state, get the silo's data, build its model."""
    cfg = AppConfig.from_run_config(context.run_config)
    node = NodeConfig.from_node_config(context.node_config)
    config = content.config_records[records.CONFIG]
    store = SiloStore.open(cfg, node, str(config.get(records.RUN_UID, "")), str(config.get(records.RUN_DIR, "")))
    if store is not None and store.restore(context.state):
        params = context.state.array_records.get(records.STATE_USER_PARAMS)
        log(
            INFO,
            "silo %d restored its state from %s (last trained round %d, user params %s)",
            node.partition_id,
            store.path,
            store.last_round(),
            "none" if params is None else fingerprint(params),
        )
    data = silo_data(cfg, node, context)
    model = silo.new_model(cfg, data, node.partition_id)
    silo.load_shared(model, dict(content.array_records[records.ARRAYS].to_torch_state_dict()))
    state.restore_user_params(context.state, model)
    return Session(cfg, node, context, config, data, model, store)


def train(session: Session, evaluate_config: ConfigRecord | None = None) -> RecordDict:
    """Train the silo's users on the shared model; the reply holds shared params only.

    Under local DP the silo first checks its budget: a round that would take its ε
    above ``privacy.local.target-epsilon`` is declined with a normal reply that says
    so. A round this silo already trained (the server resumed) is answered with the
    saved reply, never retrained.

    ``evaluate_config`` (``eval.fused``: the server's evaluate instructions for the
    received model, the global model of the previous round): the silo first
    evaluates that model exactly as an evaluate message would, then trains; the
    evaluation reply's records travel in the training reply under
    ``records.EVALUATION_PREFIX`` (and are saved with it, so a repeat resends them).
    """
    if session.cfg.privacy.mode == "distributed":  # per-user deltas into a secure sum: no arrays in the reply
        from client import distributed

        return distributed.train(session)
    store = session.store
    if store is not None and session.server_round <= store.last_round():
        return _repeat(session, store)
    evaluation = None if evaluate_config is None else _fused_evaluation(session, evaluate_config)
    if session.cfg.personalize.enabled and session.cfg.personalize.method == "ditto":
        from client import personalize  # the personal model: trained on a copy, kept in the silo, never sent

        where = None if store is None else store.path
        personalize.train(session.model, session.cfg, session.data, session.partition_id, session.server_round,
                          session.context.state, where)
    content = _private_round(session) if session.cfg.privacy.is_local else _plain_round(session)
    for key, record in (evaluation or {}).items():
        content[records.EVALUATION_PREFIX + key] = record
    if store is not None and records.ARRAYS in content.array_records:
        store.save_round(session.server_round, content, session.context.state)
    elif store is not None:
        store.save_state(session.context.state)  # a decline: its ledger line
    return content


def evaluate(session: Session) -> RecordDict:
    """Evaluate the silo's own users; the reply holds sums the server can add up."""
    if session.cfg.privacy.mode == "distributed" and session.cfg.privacy.distributed.algorithm == "als":
        from client import distributed  # ALS: each user's exact row against the model being evaluated

        distributed.als_user_rows(session)
        if session.store is not None:
            session.store.save_state(session.context.state)
    sums = silo.evaluate_users(session.model, session.cfg, session.data)
    if session.cfg.privacy.mode == "distributed":  # the released DP popularity ranking beside the model
        from client import distributed

        sums.update(distributed.popularity_sums(session))
    if session.cfg.personalize.enabled:  # a fine-tuned copy kept in the silo (client.personalize)
        from client import personalize

        where = None if session.store is None else session.store.path
        state = session.context.state
        sums.update(personalize.evaluate(session.model, session.cfg, session.data, session.partition_id,
                                         session.server_round, state, where))
    if release.is_private(session.cfg.privacy.mode):
        return _private_evaluation(session, sums)
    users = sums["test-users"]
    assert isinstance(users, (int, float))
    metrics = MetricRecord({records.NUM_EXAMPLES: int(users), **sums})
    return RecordDict({records.METRICS: metrics})


def _fused_evaluation(session: Session, evaluate_config: ConfigRecord) -> RecordDict:
    """The evaluate message's reply for ``evaluate_config`` (its round, its ledger counts)."""
    content = evaluate(dataclasses.replace(session, config=evaluate_config))
    session.model.cpu().train()  # as a freshly built model: evaluation leaves it in eval mode
    return content


def _private_evaluation(session: Session, sums: dict[str, Any]) -> RecordDict:
    """Under DP: keep the sums in the silo; release them only through the noisy mechanism.

    ``privacy.release.evaluation = withheld`` (or a noisy release the budget does not
    allow): the reply says the sums were withheld and nothing else.
    """
    _keep_own(session, "evaluation", sums)
    if session.cfg.privacy.release.evaluation == "noisy":
        from client import privacy

        state, cfg = session.context.state, session.cfg
        reply = privacy.noisy_evaluation(
            state, cfg, session.data.split, session.partition_id, session.server_round, sums, session.held_by_server()
        )
        if reply is not None:
            if session.store is not None:
                session.store.save_state(state)  # its ledger line and accountant are durable before it is sent
            return reply
    withheld = MetricRecord({records.EVAL_WITHHELD: 1, records.PARTITION_ID: session.partition_id})
    return RecordDict({records.METRICS: withheld})


def _keep_own(session: Session, kind: str, values: Mapping[str, Any]) -> None:
    """What the release policy keeps in the silo: its log, and ``silo-report.jsonl`` in its state dir."""
    line = {"round": session.server_round, "kind": kind, **{k: v for k, v in values.items() if not isinstance(v, list)}}
    log(INFO, "silo %d keeps its %s of round %d: %s", session.partition_id, kind, session.server_round, line)
    if session.store is not None:
        with (session.store.path / SILO_REPORT).open("a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")


def _plain_round(session: Session) -> RecordDict:
    cpu = time.process_time()
    stats = silo.train_round(session.model, session.cfg, session.data, session.partition_id, session.server_round)
    cpu = time.process_time() - cpu
    state.save_user_params(session.context.state, session.model)
    if release.is_private(session.cfg.privacy.mode):  # central DP: the public roster, not a data count
        _keep_own(session, "training", {"loss": stats.mean_loss, "seconds": stats.seconds})
        return _trained_content(session.model, session.data.split.num_users, None, session.partition_id)
    content = _trained_content(session.model, stats.num_examples, stats, session.partition_id)
    content.metric_records[records.METRICS][records.TRAIN_CPU_SECONDS] = cpu
    return content


def _private_round(session: Session) -> RecordDict:
    # Imported here: opacus, dp-accounting and scipy cost ~2 s per ClientApp process
    # (Flower starts one per message) and a run without local DP never needs them.
    from client import privacy

    node_state, pid = session.context.state, session.partition_id
    chain = privacy.load_ledger(node_state, pid)
    _refuse_lost_budget(session, len(chain))
    acc = privacy.load_accountant(node_state, session.cfg, session.data.split, pid)
    if session.cfg.audit.unsafe_disable_noise:
        log(
            WARNING,
            "silo %d: audit.unsafe-disable-noise is set: training WITHOUT noise "
            "while claiming σ=%.3f (audit demonstration only)",
            pid,
            acc.noise_multiplier,
        )
    result = privacy.private_round(
        session.model, session.cfg, session.data.split, acc, session.server_round, silo.device()
    )
    session.model.cpu()
    chain.append_release(result.release)
    privacy.save_ledger(node_state, chain)
    ledger = privacy.ledger_record(chain, pid, session.held_by_server())
    release = ConfigRecord(result.release.to_json())
    if result.stats is None:
        log(
            INFO,
            "silo %d declines round %d: ε would reach %.3f > budget %.3f (spent %.3f)",
            pid,
            session.server_round,
            result.release.epsilon_if_trained,
            result.release.target_epsilon,
            result.release.epsilon,
        )
        return RecordDict({records.PRIVACY: release, records.LEDGER: ledger})
    privacy.save_accountant(node_state, acc)
    state.save_user_params(node_state, session.model)
    # FedAvg weight: the silo's population of privacy units (public: it sets q), not
    # the data-dependent count of sampled examples.
    _keep_own(session, "training", {"loss": result.stats.mean_loss, "seconds": result.stats.seconds})
    content = _trained_content(session.model, acc.population, None, pid)
    content[records.PRIVACY] = release
    content[records.LEDGER] = ledger
    return content


def _refuse_lost_budget(session: Session, lines: int) -> None:
    """Refuse to train when the server holds more of this silo's ledger than the silo itself.

    That silo's privacy state (accountant, ledger) was lost or replaced by an older
    copy: training now would start ε from a lower value than the budget already spent.
    """
    held = session.held_by_server()
    if held <= lines:
        return
    where = f"its state directory {session.store.path}" if session.store is not None else "its node state"
    raise StateError(
        f"silo {session.partition_id}: the server holds {held} lines of this silo's privacy ledger, "
        f"{where} only {lines}: the silo's privacy state was lost or replaced by an older copy, and "
        "training would restart its ε below what was already spent. Restore the state directory "
        "(or start a new run); the silo will not train until then"
    )


def _repeat(session: Session, store: SiloStore) -> RecordDict:
    saved = store.saved_reply(session.server_round)
    if saved is None:
        raise StateError(
            f"silo {session.partition_id} already trained round {session.server_round} (its ledger counts it) "
            f"but the reply saved in {store.path} is for another round; it will not spend budget twice"
        )
    log(
        INFO,
        "silo %d resends its saved reply for round %d (already trained and counted)",
        session.partition_id,
        session.server_round,
    )
    if session.cfg.privacy.is_local:
        from client import privacy

        chain = privacy.load_ledger(session.context.state, session.partition_id)
        saved[records.LEDGER] = privacy.ledger_record(chain, session.partition_id, session.held_by_server())
    return saved


def _trained_content(model: Recommender, weight: int, stats: TrainStats | None, partition_id: int) -> RecordDict:
    """The training reply; ``stats`` None under DP (loss and seconds stay in the silo)."""
    metrics: dict[str, int | float | list[int] | list[float]] = {
        records.NUM_EXAMPLES: weight,
        records.PARTITION_ID: partition_id,
    }
    if stats is not None:
        metrics[records.TRAIN_LOSS] = stats.mean_loss
        metrics[records.TRAIN_SECONDS] = stats.seconds
    return RecordDict(
        {
            records.ARRAYS: ArrayRecord(torch_state_dict=shared_state(model)),
            records.METRICS: MetricRecord(metrics),
        }
    )
