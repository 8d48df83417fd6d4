"""Many by-user clients packed into one simulated node (``simulation.clients-per-node`` = K > 1).

Node ``p`` of ``⌈N/K⌉`` hosts the by-user clients (users) ``p·K .. min(p·K + K, N) − 1``.
On a train message it trains each of them from the received shared model exactly
as a node of its own would (:func:`client.silo.train_round`'s seeds, the same
:func:`common.training.train_epochs`, a fresh Adam state, the user's own rows),
and replies with their example-weighted mean model and their total weight. FedAvg
over nodes, ``Σ_n W_n·mean_n / Σ_n W_n``, is then ``Σ_c w_c·θ_c / Σ_c w_c`` over the
clients: the run of one node per client, up to float rounding (the mean is sent as
float32). A client without training positives is left out, as the server rejects
a reply of weight 0. On an evaluate message the node scores all its users at once;
evaluation sums add over users, so they equal the sum of the clients' sums.

What makes this cheap: one work model and one Adam reused for every client (its
state cleared, which is what a fresh Adam is), no global ``torch.manual_seed`` per
client (local training draws no torch randomness; users' initial rows are drawn by
seeding the CPU generator alone, the stream a node's ``torch.manual_seed`` gives),
data read from arrays prepared once per run and memory-mapped (never the whole data
set per node), and one reply per K clients. :func:`common.config._check_packed`
refuses the settings that need each client's own reply.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict

from client import silo
from common import records
from common.config import AppConfig, NodeConfig
from common.content import catalogue_text_embeddings, model_for
from common.data import prepared
from common.data.pipeline import load_interactions, split_interactions
from common.data.silo import SiloData
from common.data.split import UserSplit
from common.errors import ConfigError, DataError
from common.models import Recommender, build_model, is_private, private_state
from common.run_config import Scalar
from common.seeding import derive_seed, numpy_rng
from common.training import train_epochs

VIRTUAL_CLIENTS = "virtual-clients"  # train metrics of a packed node: clients whose updates its reply averages

_SPLIT_ROWS = ("val_item", "test_item", "val_negatives", "test_negatives", "user_global_idx")


def num_nodes(num_clients: int, clients_per_node: int) -> int:
    """Simulated nodes that host ``num_clients`` clients, ``clients_per_node`` each (the last may hold fewer)."""
    return math.ceil(num_clients / clients_per_node)


def node_users(partition_id: int, num_partitions: int, clients_per_node: int, num_users: int) -> range:
    """The users (by-user clients) node ``partition_id`` of ``num_partitions`` hosts.

    Raises
    ------
    ConfigError
        If the number of nodes is not ``⌈num_users / clients_per_node⌉``.
    """
    expected = num_nodes(num_users, clients_per_node)
    if num_partitions != expected:
        raise ConfigError(
            f"simulation.clients-per-node = {clients_per_node}: {num_users} by-user clients need "
            f"{expected} simulated nodes (num-supernodes), got {num_partitions}"
        )
    lo = partition_id * clients_per_node
    return range(lo, min(lo + clients_per_node, num_users))


# ---------------------------------------------------------------- shared prepared data
def _data_key(cfg: AppConfig) -> str:
    """Identifies the pooled split: the data settings and the run seed."""
    text = json.dumps({"seed": cfg.seed, "data": repr(cfg.data)}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def pooled_dir(cfg: AppConfig, run_dir: str) -> Path:
    """Where the run's pooled split lies as ``.npy`` files: ``<run-dir>/packed-data/<key>``."""
    root = Path(run_dir) / "packed-data" if run_dir else Path(tempfile.gettempdir()) / "fedrec-packed-data"
    return root / _data_key(cfg)


def ensure_pooled(cfg: AppConfig, run_dir: str) -> Path:
    """Write the pooled split once per run (the first node to need it; the others wait on a lock).

    Training rows are stored stably sorted by user with each user's first row in
    ``user_start``, so a node reads its users' rows as one slice, in the order a node
    of their own would see them.
    """
    where = pooled_dir(cfg, run_dir)
    done = where / "done"
    if done.exists():
        return where
    if cfg.data.path and Path(cfg.data.path).is_dir():
        path = Path(cfg.data.path)
        if prepared.is_prepared_silo(path) or prepared.silo_counts(path) is not None:
            raise ConfigError(
                f"simulation.clients-per-node: data.path {path} holds prepared silo files; packed "
                "by-user clients are simulated from the data set itself"
            )
    where.mkdir(parents=True, exist_ok=True)
    with (where / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return where
        pooled = split_interactions(cfg.data, cfg.seed, load_interactions(cfg.data, cfg.seed))
        split = pooled.split
        order = np.argsort(split.train_user, kind="stable")
        arrays = {
            "train_user": split.train_user[order],
            "train_item": split.train_item[order],
            "user_start": np.searchsorted(split.train_user[order], np.arange(split.num_users + 1)),
            "item_popularity": pooled.item_popularity,
            "meta": np.array([split.num_items, split.num_users]),
            **{name: getattr(split, name) for name in _SPLIT_ROWS},
        }
        for name, array in arrays.items():
            np.save(where / f"{name}.npy", np.ascontiguousarray(array))
        (where / "order").write_text(split.order)
        done.write_text("")
    return where


def load_users(where: Path, users: range) -> SiloData:
    """The split of ``users`` (re-indexed 0..len−1) from the prepared files, reading only their rows."""

    def part(name: str) -> np.ndarray:
        return np.load(where / f"{name}.npy", mmap_mode="r")

    num_items, total = (int(x) for x in part("meta"))
    if users.stop > total:
        raise DataError(f"packed node wants users up to {users.stop - 1}, the data set has {total}")
    start = part("user_start")
    lo, hi = int(start[users.start]), int(start[users.stop])
    split = UserSplit(
        num_items=num_items,
        train_user=np.array(part("train_user")[lo:hi]) - users.start,
        train_item=np.array(part("train_item")[lo:hi]),
        **{name: np.array(part(name)[users.start:users.stop]) for name in _SPLIT_ROWS},
        order=(where / "order").read_text(),
    )
    return SiloData(split, np.array(part("item_popularity")))


# ---------------------------------------------------------------- one node
@dataclass
class PackedNode:
    """What a packed node keeps between messages in its process (rebuilt if the process is new)."""

    cfg: AppConfig
    users: range
    data: SiloData
    starts: np.ndarray  # (K + 1,) first training row of each local user
    work: Recommender  # one user: every client trains in it in turn
    optimizer: torch.optim.Adam
    device: torch.device
    splits: list[UserSplit | None] = field(default_factory=list)
    flat: tuple[torch.Tensor, torch.Tensor] = (torch.zeros(0), torch.zeros(0))  # shared, private parameters
    eval_model: Recommender | None = None

    def client_split(self, i: int) -> UserSplit:
        """Local user ``i`` alone, as a node of its own holds it (user index 0)."""
        cached = self.splits[i]
        if cached is None:
            s = self.data.split
            lo, hi = int(self.starts[i]), int(self.starts[i + 1])
            cached = UserSplit(
                num_items=s.num_items,
                train_user=np.zeros(hi - lo, dtype=np.int64),
                train_item=s.train_item[lo:hi],
                **{name: getattr(s, name)[i : i + 1] for name in _SPLIT_ROWS},
                order=s.order,
            )
            self.splits[i] = cached
        return cached


_NODES: dict[tuple[str, str, int], PackedNode] = {}


def _node(cfg: AppConfig, node: NodeConfig, run_dir: str) -> PackedNode:
    key = (run_dir, _data_key(cfg), node.partition_id)
    found = _NODES.get(key)
    if found is not None and found.cfg == cfg:
        return found
    where = ensure_pooled(cfg, run_dir)
    total = int(np.load(where / "meta.npy")[1])
    users = node_users(node.partition_id, node.num_partitions, cfg.simulation.clients_per_node, total)
    data = load_users(where, users)
    dev = silo.device()
    work = model_for(cfg, 1, data.split.num_items).to(dev)
    named = list(work.named_parameters())
    flat = (_flatten([p for k, p in named if not is_private(k)]), _flatten([p for k, p in named if is_private(k)]))
    packed = PackedNode(
        cfg=cfg,
        users=users,
        data=data,
        starts=np.searchsorted(data.split.train_user, np.arange(len(users) + 1)),
        work=work,
        optimizer=torch.optim.Adam(work.parameters(), lr=cfg.train.lr),
        device=dev,
        splits=[None] * len(users),
        flat=flat,
    )
    _NODES[key] = packed
    return packed


def initial_user_rows(cfg: AppConfig, users: range, num_items: int) -> dict[str, torch.Tensor]:
    """Each user's initial private rows, exactly those of :func:`client.silo.new_model` on a node of its own.

    That node seeds with ``torch.manual_seed(derive_seed(seed, "user-init", u))`` and
    builds a one-user model; here only the CPU generator is seeded (what the CPU
    stream depends on) and the global generator's state is restored afterwards.
    """
    text = catalogue_text_embeddings(cfg, num_items) if cfg.model.name == "hybrid-mf" else None
    rows: dict[str, list[torch.Tensor]] = {}
    saved = torch.random.get_rng_state()
    try:
        for u in users:
            torch.default_generator.manual_seed(derive_seed(cfg.seed, "user-init", u))
            m = build_model(cfg.model.name, 1, num_items, cfg.model.dim, cfg.model.mlp_layers, item_text=text)
            for name, value in private_state(m).items():
                rows.setdefault(name, []).append(value)
    finally:
        torch.random.set_rng_state(saved)
    return {name: torch.cat(parts) for name, parts in rows.items()}


def _user_rows(context: Context, packed: PackedNode) -> dict[str, torch.Tensor]:
    stored = context.state.array_records.get(records.STATE_USER_PARAMS)
    if stored is not None:
        return {k: v.clone() for k, v in stored.to_torch_state_dict().items()}
    return initial_user_rows(packed.cfg, packed.users, packed.data.split.num_items)


def _save_user_rows(context: Context, rows: dict[str, torch.Tensor]) -> None:
    context.state[records.STATE_USER_PARAMS] = ArrayRecord(torch_state_dict=rows)


def _open(content: RecordDict, context: Context) -> tuple[PackedNode, int, int, dict[str, torch.Tensor]]:
    """The node, its partition id, the server round and the users' rows of one message."""
    cfg = AppConfig.from_run_config(context.run_config)
    node = NodeConfig.from_node_config(context.node_config)
    config = content.config_records[records.CONFIG]
    packed = _node(cfg, node, str(config.get(records.RUN_DIR, "")))
    server_round = int(config[records.SERVER_ROUND])  # type: ignore[arg-type]
    return packed, node.partition_id, server_round, _user_rows(context, packed)


def train(content: RecordDict, context: Context) -> RecordDict:
    """Train every client of the node from the received model; reply with their weighted mean and weight."""
    packed, partition_id, server_round, rows = _open(content, context)
    shared = {k: v.to(packed.device) for k, v in content.array_records[records.ARRAYS].to_torch_state_dict().items()}
    reply = train_clients(packed, shared, rows, server_round)
    _save_user_rows(context, rows)
    reply.metric_records[records.METRICS][records.PARTITION_ID] = partition_id
    return reply


def _flatten(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Make ``params`` views into one new flat buffer (so a client's copy-in and sum are one op each)."""
    flat = torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0)
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def train_clients(
    packed: PackedNode, shared: dict[str, torch.Tensor], rows: dict[str, torch.Tensor], server_round: int
) -> RecordDict:
    """Each client from ``shared`` in turn; ``rows`` (K, ...) are updated in place; the reply content."""
    cfg, work, opt = packed.cfg, packed.work, packed.optimizer
    names = [k for k, _ in work.named_parameters() if not is_private(k)]
    private = [k for k, _ in work.named_parameters() if is_private(k)]
    if set(names) != set(shared):
        raise ValueError(f"shared parameters mismatch: model {sorted(names)}, received {sorted(shared)}")
    flat, flat_private = packed.flat
    start = torch.cat([shared[k].reshape(-1).to(flat) for k in names])
    k_users = len(packed.users)
    user_rows = torch.cat([rows[k].reshape(k_users, -1) for k in private], dim=1).to(flat_private)
    total = torch.zeros(flat.shape, dtype=torch.float64, device=flat.device)
    weight, loss_sum, clients, slowest, slowest_cpu = 0, 0.0, 0, 0.0, 0.0
    for i, user in enumerate(packed.users):
        split = packed.client_split(i)
        cpu = time.process_time()
        with torch.no_grad():
            flat.copy_(start)
            flat_private.copy_(user_rows[i])
        opt.state.clear()  # a fresh Adam: its state is created at the first step
        stats = train_epochs(
            work, split, cfg.train, epochs=cfg.train.local_epochs,
            rng=numpy_rng(cfg.seed, "train", user, server_round), device=packed.device, optimizer=opt,
        )
        with torch.no_grad():
            user_rows[i] = flat_private
            if stats.num_examples > 0:  # the server rejects a reply of weight 0
                total.add_(flat, alpha=float(stats.num_examples))
        cpu = time.process_time() - cpu
        if stats.num_examples > 0:
            weight += stats.num_examples
            loss_sum += stats.num_examples * stats.mean_loss
            clients += 1
            slowest, slowest_cpu = max(slowest, stats.seconds), max(slowest_cpu, cpu)
    offset = 0
    for k in private:
        width = rows[k][0].numel()
        rows[k].copy_(user_rows[:, offset : offset + width].reshape(rows[k].shape))
        offset += width
    mean_flat = (total / weight).to(flat.dtype) if weight else start
    mean, offset = {}, 0
    for k, p in work.named_parameters():  # in shared_state's order
        if not is_private(k):
            mean[k] = mean_flat[offset : offset + p.numel()].reshape(p.shape).cpu().clone()
            offset += p.numel()
    metrics: dict[str, int | float | list[int] | list[float]] = {
        records.NUM_EXAMPLES: weight,
        VIRTUAL_CLIENTS: clients,
        records.TRAIN_LOSS: loss_sum / weight if weight else float("nan"),
        records.TRAIN_SECONDS: slowest,
        records.TRAIN_CPU_SECONDS: slowest_cpu,
    }
    return RecordDict({records.ARRAYS: ArrayRecord(torch_state_dict=mean), records.METRICS: MetricRecord(metrics)})


def evaluate(content: RecordDict, context: Context) -> RecordDict:
    """Evaluation sums of all the node's users at once (sums add over users)."""
    packed, _, _, rows = _open(content, context)
    cfg = packed.cfg
    if packed.eval_model is None:
        packed.eval_model = model_for(cfg, len(packed.users), packed.data.split.num_items)
    model = packed.eval_model
    shared = dict(content.array_records[records.ARRAYS].to_torch_state_dict())
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(rows[k] if is_private(k) else shared[k])
    sums = silo.evaluate_users(model, cfg, packed.data)
    users = sums["test-users"]
    assert isinstance(users, (int, float))
    return RecordDict({records.METRICS: MetricRecord({records.NUM_EXAMPLES: int(users), **sums})})


def forget_nodes() -> None:
    """Drop the process's cached nodes (tests; a new run in the same process rebuilds them)."""
    _NODES.clear()



def is_packed(run_config: Mapping[str, Scalar]) -> bool:
    """Whether the run packs clients into nodes (read without parsing the whole config)."""
    value = run_config.get("simulation.clients-per-node", 1)
    return isinstance(value, int) and not isinstance(value, bool) and value > 1
