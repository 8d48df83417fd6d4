"""fedrec ClientApp: wires Flower messages to a silo's training and evaluation."""

from logging import INFO, WARNING

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.supercore import log

from client import silo, state
from client.durable import SiloStore, StateError, fingerprint
from common import records
from common.config import AppConfig, NodeConfig
from common.data.pipeline import silo_data
from common.data.silo import SiloData
from common.models import Recommender, shared_state
from common.privacy import canaries
from common.training import TrainStats

app = ClientApp()


def _silo_data(cfg: AppConfig, node: NodeConfig, context: Context) -> SiloData:
    """The silo's data: from node state, else loaded once and kept there.

    With ``audit.canaries`` the catalogue gets the canary items, and the audited
    silo its included canary users (see :mod:`common.privacy.canaries`).
    """
    data = state.load_silo_data(context.state)
    if data is None:
        data = silo_data(
            cfg.data, cfg.seed, node.partition_id, node.num_partitions, node.data_path
        )
        if cfg.audit.canaries:
            data = _with_canaries(cfg, node, data)
        state.save_silo_data(context.state, data)
    return data


def _with_canaries(cfg: AppConfig, node: NodeConfig, data: SiloData) -> SiloData:
    plan = canaries.canary_plan(cfg.audit, data.split.num_items)
    split = canaries.with_canary_items(data.split, plan.count)
    if node.partition_id == cfg.audit.canary_silo:
        split = canaries.with_canary_users(split, plan)
        log(INFO, "silo %d trains with %d of %d audit canaries", node.partition_id, int(plan.included.sum()), plan.count)
    popularity = np.concatenate([data.item_popularity, np.zeros(plan.count)])
    return SiloData(split, popularity)


def _prepare(
    msg: Message, context: Context
) -> tuple[AppConfig, NodeConfig, SiloData, Recommender, SiloStore | None]:
    """Parse settings, restore durable state, get the silo's data, build its model."""
    cfg = AppConfig.from_run_config(context.run_config)
    node = NodeConfig.from_node_config(context.node_config)
    run_uid = str(msg.content.config_records[records.CONFIG].get(records.RUN_UID, ""))
    store = SiloStore.open(cfg, node, run_uid)
    if store is not None and store.restore(context.state):
        params = context.state.array_records.get(records.STATE_USER_PARAMS)
        log(
            INFO, "silo %d restored its state from %s (last trained round %d, user params %s)",
            node.partition_id, store.path, store.last_round(), "none" if params is None else fingerprint(params),
        )
    data = _silo_data(cfg, node, context)
    model = silo.new_model(cfg, data, node.partition_id)
    shared = msg.content.array_records[records.ARRAYS].to_torch_state_dict()
    silo.load_shared(model, dict(shared))
    state.restore_user_params(context.state, model)
    return cfg, node, data, model, store


# ---------------------------------------------------------------- handlers
@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the silo's users on the received shared model; return shared params only.

    Under local DP the silo first checks its budget: a round that would take its ε
    above ``privacy.local.target-epsilon`` is declined with a normal reply that says so.
    """
    cfg, node, data, model, store = _prepare(msg, context)
    server_round = int(msg.content.config_records[records.CONFIG][records.SERVER_ROUND])
    if store is not None and server_round <= store.last_round():
        return _repeat_reply(msg, context, cfg, node, store, server_round)
    reply = _train(msg, context, cfg, node, data, model, server_round)
    if store is not None and records.ARRAYS in reply.content.array_records:
        store.save_round(server_round, reply.content, context.state)
    elif store is not None:
        store.save_state(context.state)  # a decline: its ledger line
    return reply


def _repeat_reply(
    msg: Message, context: Context, cfg: AppConfig, node: NodeConfig, store: SiloStore, server_round: int
) -> Message:
    """A round this silo already trained (the server resumed): resend, never retrain."""
    saved = store.saved_reply(server_round)
    if saved is None:
        raise StateError(
            f"silo {node.partition_id} already trained round {server_round} (its ledger counts it) "
            f"but the reply saved in {store.path} is for another round; it will not spend budget twice"
        )
    log(INFO, "silo %d resends its saved reply for round %d (already trained and counted)", node.partition_id, server_round)
    if cfg.privacy.is_local:
        from client import privacy

        chain = privacy.load_ledger(context.state, node.partition_id)
        saved[records.LEDGER] = privacy.ledger_record(chain, node.partition_id, _held_by_server(msg, node.partition_id))
    return Message(content=saved, reply_to=msg)


def _train(
    msg: Message, context: Context, cfg: AppConfig, node: NodeConfig, data: SiloData, model: Recommender, server_round: int
) -> Message:
    if not cfg.privacy.is_local:
        stats = silo.train_round(model, cfg, data, node.partition_id, server_round)
        state.save_user_params(context.state, model)
        return _train_reply(msg, model, stats.num_examples, stats, None)

    # Imported here: opacus, dp-accounting and scipy cost ~2 s per ClientApp process
    # (Flower starts one per message) and a run without local DP never needs them.
    from client import privacy

    acc = privacy.load_accountant(context.state, cfg, data.split)
    chain = privacy.load_ledger(context.state, node.partition_id)
    if cfg.audit.unsafe_disable_noise:
        log(WARNING, "silo %d: audit.unsafe-disable-noise is set: training WITHOUT noise "
            "while claiming σ=%.3f (audit demonstration only)", node.partition_id, acc.noise_multiplier)
    result = privacy.private_round(model, cfg, data.split, acc, server_round, silo.device())
    model.cpu()
    privacy.record_round(chain, acc, result, cfg, server_round)
    privacy.save_ledger(context.state, chain)
    summary = privacy.reply_record(
        acc, result, node.partition_id, cfg.privacy.local.clip, cfg.privacy.local.target_epsilon
    )
    ledger = privacy.ledger_record(chain, node.partition_id, _held_by_server(msg, node.partition_id))
    if not result.trained:
        log(
            INFO,
            "silo %d declines round %d: ε would reach %.3f > budget %.3f (spent %.3f)",
            node.partition_id, server_round, result.epsilon_if_trained,
            cfg.privacy.local.target_epsilon, result.epsilon,
        )
        content = RecordDict({records.PRIVACY: summary, records.LEDGER: ledger})
        return Message(content=content, reply_to=msg)
    privacy.save_accountant(context.state, acc)
    state.save_user_params(context.state, model)
    # FedAvg weight: the silo's population of privacy units (public: it sets q), not
    # the data-dependent count of sampled examples.
    reply = _train_reply(msg, model, acc.population, result.stats, summary)
    reply.content[records.LEDGER] = ledger
    return reply


def _held_by_server(msg: Message, partition_id: int) -> int:
    """Ledger lines of this silo the server says it holds (0 when it does not say)."""
    counts = msg.content.config_records[records.CONFIG].get(records.LEDGER_COUNTS, [])
    return int(counts[partition_id]) if partition_id < len(counts) else 0  # type: ignore[arg-type, index]


def _train_reply(
    msg: Message,
    model: Recommender,
    weight: int,
    stats: TrainStats,
    summary: ConfigRecord | None,
) -> Message:
    content = RecordDict(
        {
            records.ARRAYS: ArrayRecord(torch_state_dict=shared_state(model)),
            records.METRICS: MetricRecord(
                {
                    records.NUM_EXAMPLES: weight,
                    records.TRAIN_LOSS: stats.mean_loss,
                    records.TRAIN_SECONDS: stats.seconds,
                }
            ),
        }
    )
    if summary is not None:
        content[records.PRIVACY] = summary
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the silo's own users; return sums the server can add up."""
    cfg, _, data, model, _ = _prepare(msg, context)
    sums = silo.evaluate_users(model, cfg, data)
    metrics = MetricRecord({records.NUM_EXAMPLES: int(sums["test-users"]), **sums})
    return Message(content=RecordDict({records.METRICS: metrics}), reply_to=msg)
