"""privacy.mode = distributed end to end over LocalGrid: per-user deltas, replies, ledger replay, dropouts."""

import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import pld
from flwr.app import Message

from client.app import app as client_app
from client.distributed import clipped_delta_sum
from common import records
from common.config import AppConfig
from common.data.split import UserSplit
from common.errors import ConfigError
from common.models import MF
from common.privacy import distributed as dd
from common.privacy.ledger import Chain
from common.run_config import load_default_run_config
from common.secagg import wire
from common.seeding import numpy_rng
from common.training import interaction_loss, interaction_negatives
from server.distributed import popularity_biases
from server.federation import run_federation
from tests.fakes import GarbageSecAggGrid, LocalGrid

SILOS = 3


def distributed_config(run_dir: Path, **extra):
    cfg = load_default_run_config()
    cfg.update(
        {
            "privacy.mode": "distributed",
            "strategy.norm-action": "none",
            "strategy.reject-opposed": False,
            "data.synthetic.num-users": 150,
            "data.synthetic.num-items": 200,
            "data.synthetic.mean-interactions": 15,
            "num-server-rounds": 2,
            "eval.every": 2,
            "run-dir": str(run_dir),
            "state-root": str(run_dir / "state"),
            "privacy.distributed.users-per-round": 30.0,
            "privacy.distributed.noise-multiplier": 1.0,  # fixed σ (= σ_h): no PLD calibration in the test
            "privacy.distributed.target-epsilon": 0.0,
            "privacy.distributed.user-steps": 2,
            **extra,
        }
    )
    return cfg


def server_ledger(run_dir: Path) -> list[dict]:
    lines = (run_dir / "ledger" / "server.jsonl").read_text().splitlines()
    Chain("server", lines)  # verifies the hash chain
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("distributed") / "run"
    replies: list[Message] = []
    cfg = distributed_config(run_dir)
    grid = LocalGrid(client_app, cfg, SILOS, on_reply=replies.append)
    run_federation(grid, cfg)
    return run_dir, replies, cfg


def test_training_replies_carry_no_arrays_only_roster_partition_and_flag(run):
    _, replies, _ = run
    train = [r for r in replies if r.metadata.message_type == "train"]
    assert len(train) == SILOS * (1 + 1 + 2)  # roster, popularity, two rounds
    for reply in train:
        assert not reply.content.array_records
        metrics = dict(reply.content.metric_records[records.METRICS])
        assert set(metrics) <= {records.PARTITION_ID, records.NUM_EXAMPLES, dd.STAGED}
    evaluation = [r for r in replies if r.metadata.message_type == "evaluate"]
    assert evaluation and all(
        r.content.metric_records[records.METRICS][records.EVAL_WITHHELD] == 1 for r in evaluation
    )
    secagg = [r for r in replies if r.metadata.message_type == wire.MESSAGE_TYPE]
    assert len(secagg) == SILOS * 4 * 3  # four stages, three secure sums (histogram, two rounds)


def test_union_epsilon_replays_from_the_server_ledger_with_dp_accounting_alone(run):
    run_dir, _, cfg = run
    events = server_ledger(run_dir)
    kinds = [e["kind"] for e in events if e["kind"].startswith("distributed")]
    assert kinds == [dd.KIND_HISTOGRAM, dd.KIND_TRAINING, dd.KIND_TRAINING]
    releases = [e for e in events if e["kind"].startswith("distributed")]
    population = 150
    assert all(e["population"] == population and e["unit"] == "user" and e["owner"] == "server" for e in releases)
    assert releases[0]["sample-rate"] == 1.0 and releases[1]["sample-rate"] == pytest.approx(30 / population)
    # the words follow q: the histogram covers every user (no sampling), a round samples at q
    assert (releases[0]["mechanism"], releases[0]["sampling"]) == ("gaussian", "none")
    assert all((e["mechanism"], e["sampling"]) == ("poisson-subsampled-gaussian", "poisson") for e in releases[1:])
    accountant = pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    for e in releases:
        step = dp_accounting.GaussianDpEvent(e["noise-multiplier"])
        if e["sample-rate"] < 1:
            step = dp_accounting.PoissonSampledDpEvent(e["sample-rate"], step)
        accountant.compose(step)
    replayed = accountant.get_epsilon(releases[-1]["delta"])
    assert releases[-1]["delta"] == 1e-5  # min(1e-5, 1/(10·150))
    assert replayed == pytest.approx(releases[-1]["epsilon"], abs=0.01)
    assert [e["noise-multiplier"] for e in releases] == [1.0, 1.0, 1.0]
    single = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    single.compose(dp_accounting.GaussianDpEvent(1.0))
    assert releases[0]["epsilon"] == pytest.approx(single.get_epsilon(1e-5), abs=0.01)  # the histogram alone
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["central-privacy"]["epsilon"] == pytest.approx(releases[-1]["epsilon"])


def test_each_silo_keeps_its_own_view_with_the_same_mechanism(run):
    run_dir, _, _ = run
    server = [e for e in server_ledger(run_dir) if e["kind"].startswith("distributed")]
    silo_ledgers = sorted((run_dir / "state").glob("silo-*/*/ledger.jsonl"))
    assert len(silo_ledgers) == SILOS
    for path in silo_ledgers:
        own = [json.loads(line) for line in path.read_text().splitlines()]
        assert [e["kind"] for e in own] == [e["kind"] for e in server]
        for mine, theirs in zip(own, server, strict=True):
            for key in ("noise-multiplier", "sample-rate", "population", "delta", "epsilon"):
                assert mine[key] == pytest.approx(theirs[key]), key


def test_fedrec_audit_replays_the_run(run):
    from common.privacy.audit import audit_run

    run_dir, _, _ = run
    result = audit_run(run_dir, empirical=False)
    assert not result.problems, result.problems


def test_popularity_biases_are_centred_log_counts():
    b = popularity_biases(np.array([-3.0, 0.0, math.e - 1, math.e**2 - 1]))
    assert b == pytest.approx(np.array([0.0, 0.0, 1.0, 2.0]) - 0.75)


# ---------------------------------------------------------------- per-user deltas
def _toy(num_users=4, num_items=6, seed=0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(num_users), 3)
    items = np.concatenate([rng.choice(num_items, 3, replace=False) for _ in range(num_users)])
    split = UserSplit(
        num_items=num_items,
        train_user=users.astype(np.int64),
        train_item=items.astype(np.int64),
        val_item=np.zeros(num_users, dtype=np.int64),
        test_item=np.zeros(num_users, dtype=np.int64),
        val_negatives=np.zeros((num_users, 1), dtype=np.int64),
        test_negatives=np.zeros((num_users, 1), dtype=np.int64),
        user_global_idx=np.arange(num_users, dtype=np.int64),
    )
    torch.manual_seed(seed)
    return split, MF(num_users, num_items, 3, init_std=0.5)


def _cfg(**extra):
    base = {"privacy.mode": "distributed", "strategy.norm-action": "none", "strategy.reject-opposed": False}
    return AppConfig.from_run_config({**load_default_run_config(), **base, **extra})


def test_a_users_delta_is_minus_lr_times_the_gradient_of_their_mean_loss():
    split, model = _toy()
    cfg = _cfg(**{"privacy.distributed.lr": 0.5, "train.l2": 0.0})
    total, clipped = clipped_delta_sum(model, split, cfg, np.array([2]), clip=1e6, partition_id=0, server_round=1)
    assert clipped == 0
    # by hand: user 2's interactions with the same keyed negatives, mean loss, autograd on the whole model
    rng = numpy_rng(cfg.seed, "distributed-negatives", 0, 1)
    mask = split.train_user == 2
    neg = interaction_negatives(int(rng.integers(2**63)), split.train_user[mask], split.train_item[mask],
                                cfg.train.num_negatives, split.num_items)  # fmt: skip
    items = torch.from_numpy(np.concatenate([split.train_item[mask, None], neg], axis=1))
    loss = interaction_loss(model(torch.full((3,), 2), items), cfg.train.loss).mean()
    model.zero_grad()
    loss.backward()
    expected = np.concatenate(
        [-0.5 * model.global_bias.value.grad.numpy(), -0.5 * model.item_bias.weight.grad.numpy().ravel(),
         -0.5 * model.item_embedding.weight.grad.numpy().ravel()]
    )  # fmt: skip
    np.testing.assert_allclose(total, expected, rtol=1e-5, atol=1e-7)


def test_deltas_are_clipped_per_user_and_independent_of_the_other_users():
    split, model = _toy(num_users=5)
    cfg = _cfg(**{"privacy.distributed.lr": 5.0})
    clip = 0.05
    both, clipped = clipped_delta_sum(model, split, cfg, np.array([1, 3]), clip=clip, partition_id=0, server_round=2)
    assert clipped == 2
    one = [clipped_delta_sum(model, split, cfg, np.array([u]), clip, 0, 2)[0] for u in (1, 3)]
    for v in one:
        assert np.linalg.norm(v) == pytest.approx(clip, rel=1e-6)
    np.testing.assert_allclose(both, one[0] + one[1], atol=1e-12)
    # zero out user 4 (not sampled): the sampled users' sum does not move
    keep = split.train_user != 4
    fewer = UserSplit(
        num_items=split.num_items, train_user=split.train_user[keep], train_item=split.train_item[keep],
        val_item=split.val_item, test_item=split.test_item, val_negatives=split.val_negatives,
        test_negatives=split.test_negatives, user_global_idx=split.user_global_idx,
    )  # fmt: skip
    np.testing.assert_allclose(clipped_delta_sum(model, fewer, cfg, np.array([1, 3]), clip, 0, 2)[0], both)


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"strategy.aggregator": "median"}, "strategy.aggregator"),
        ({"model.name": "neumf"}, "model.name"),
        ({"privacy.distributed.noise-multiplier": 0.0, "privacy.distributed.target-epsilon": 0.0}, "noise-multiplier"),
        ({"strategy.fraction-train": 0.5}, "fraction-train"),
    ],
)
def test_config_refuses_what_distributed_dp_cannot_do(extra, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**extra)


def test_auto_aggregator_is_the_plain_sum():
    assert _cfg(**{"strategy.aggregator": "auto"}).strategy.aggregator == "fedavg"


def test_sigma_is_calibrated_so_histogram_and_rounds_meet_the_target():
    settings = _cfg(**{"privacy.distributed.target-epsilon": 2.0}).privacy.distributed
    mech = dd.mechanism(settings, 10, 1000, 5, accountant="rdp")
    assert mech.delta == 1e-5 and mech.rate == pytest.approx(0.1) and mech.threshold == 4
    assert mech.share_std == pytest.approx(mech.noise_multiplier * 0.5 / 2)  # σC/√(S−T), S − T = 4
    from common.privacy.accounting import epsilon

    uses = [dd.training_use(mech.noise_multiplier, mech.rate)] * 10
    hist = dd.histogram_use(mech.histogram_noise_multiplier)
    assert epsilon([hist], mech.delta, "rdp") == pytest.approx(0.2, rel=0.01)  # its 10% share
    assert epsilon([*uses, hist], mech.delta, "rdp") == pytest.approx(2.0, rel=0.01)
    assert epsilon([*uses, hist], mech.delta, "rdp") <= 2.0


# ---------------------------------------------------------------- dropouts
def test_a_silo_dropping_mid_round_leaves_the_others_sum_and_the_ledger_says_so(tmp_path):
    run_dir = tmp_path / "run"
    cfg = distributed_config(run_dir, **{"num-server-rounds": 1, "privacy.distributed.popularity": False})

    def drop(node, msg):  # the last node stops answering after sharing keys in round 1
        if msg.metadata.message_type != wire.MESSAGE_TYPE or node != max(grid.get_node_ids()):
            return False
        stage, _ = wire.decode(msg.content, "test")
        return stage in ("collect", "unmask")

    grid = LocalGrid(client_app, cfg, SILOS, drop=drop)
    run_federation(grid, cfg)
    releases = [e for e in server_ledger(run_dir) if e["kind"] == dd.KIND_TRAINING]
    assert len(releases) == 1  # 2 of 3 silos: threshold max(2, 3 - 1) = 2, T = 1 missing: σ unchanged
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert any("dropped" in r["reason"] for r in record["rejected"])
    assert releases[0]["noise-multiplier"] == 1.0


def test_the_servers_user_level_release_names_the_union_relation():
    from common.privacy.events import UNION_NEIGHBOURING, PrivacyRelease

    rel = PrivacyRelease(
        owner="server", server_round=1, kind="distributed-dp-fedavg", unit="user", accountant="pld", delta=1e-5,
        delta_rule="default", epsilon=1.0, target_epsilon=8.0, noise_multiplier=1.0, sample_rate=0.1, clip=1.0,
        population=943, steps=1, total_steps=1, rounds_trained=1, released="the model",
    )
    assert rel.neighbouring == UNION_NEIGHBOURING and "any silo" in rel.to_json()["neighbouring"]
    import dataclasses

    assert "in one silo" in dataclasses.replace(rel, owner="silo-0", kind="dp-sgd").neighbouring


def test_no_silo_giving_its_roster_stops_the_run_without_a_release(tmp_path):
    # Arrange: every silo is silent from the first message (the roster request) on
    run_dir = tmp_path / "run"
    cfg = distributed_config(run_dir, **{"num-server-rounds": 1})
    grid = LocalGrid(client_app, cfg, SILOS, drop=lambda node, msg: True)
    # Act: the server stops before round 1 instead of failing to build a mechanism for 0 silos
    run_federation(grid, cfg)
    # Assert: nothing trained, nothing released
    ledger = run_dir / "ledger" / "server.jsonl"
    assert not ledger.exists() or not [e for e in server_ledger(run_dir) if e["kind"] in (dd.KIND_TRAINING, dd.KIND_HISTOGRAM)]
    metrics = run_dir / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text().strip() == ""


def test_an_aborted_secure_sum_is_in_the_ledger_and_releases_nothing(tmp_path):
    from common.privacy.audit import audit_run
    from common.privacy.replay import dropout_text
    from common.secagg import ABORT_EVENT

    # Arrange: round 2's training message reaches only node 1 of 3 (threshold max(2, 3 − 1) = 2)
    run_dir = tmp_path / "run"
    cfg = distributed_config(run_dir, **{"privacy.distributed.popularity": False})
    first = []

    def drop(node, msg):
        config = msg.content.config_records.get(records.CONFIG)
        if msg.metadata.message_type == "train" and config is not None and config.get(dd.PHASE) == "train":
            first.append(node)
            return config.get(records.SERVER_ROUND) == 2 and node != min(first)
        return False

    # Act
    run_federation(LocalGrid(client_app, cfg, SILOS, drop=drop), cfg)
    # Assert: round 1 released, round 2 aborted with a ledger line naming the one silo that staged
    events = server_ledger(run_dir)
    assert [e["round"] for e in events if e["kind"] == dd.KIND_TRAINING] == [1]
    aborts = [e for e in events if e["kind"] == ABORT_EVENT]
    assert len(aborts) == 1
    abort = aborts[0]
    assert abort["round"] == 2 and abort["release"] == dd.KIND_TRAINING and abort["threshold"] == 2
    assert [s["node"] for s in abort["staged"]] == [min(first)] and abort["staged"][0]["silo"].startswith("silo-")
    assert "1 of 3 silos staged, below the threshold 2" in abort["reason"]
    # fedrec audit replays the one release and names the abort
    result = audit_run(run_dir, empirical=False)
    server = next(led for led in result.ledgers if led.owner == "server")
    assert [t.round for t in server.trajectory] == [1]
    (line,) = [dropout_text(d) for d in server.dropouts]
    assert "round 2" in line and "aborted" in line and "no ε spent" in line
    # and the round's record says the model was kept, round 1's was not
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"].get(records.MODEL_KEPT) for r in rounds] == [None, 1]
    assert rounds[1]["train"][records.TRAIN_SILOS] == 0


def test_each_release_is_in_the_ledger_before_the_unmask_and_an_unmask_failure_keeps_it_counted(tmp_path):
    from common.privacy.audit import audit_run
    from common.privacy.replay import dropout_text
    from common.secagg import ABORT_EVENT

    # Arrange: in round 2, two of the three silos stop answering at unmask (1 < threshold 2)
    run_dir = tmp_path / "run"
    cfg = distributed_config(run_dir)
    ledger_at_unmask: list[tuple[int, list[dict]]] = []  # (round, the server ledger) as each unmask stage starts

    def drop(node, msg):
        if msg.metadata.message_type != wire.MESSAGE_TYPE:
            return False
        stage, payload = wire.decode(msg.content, "test")
        if stage != "unmask":
            return False
        server_round = int(payload["round"])
        if node == min(grid.get_node_ids()):  # the stage's first message
            ledger_at_unmask.append((server_round, server_ledger(run_dir)))
        return server_round == 2 and node != min(grid.get_node_ids())

    grid = LocalGrid(client_app, cfg, SILOS, drop=drop)
    # Act
    run_federation(grid, cfg)
    # Assert: the histogram's and every round's release were written before their unmask stage
    expected = [(1, dd.KIND_HISTOGRAM), (1, dd.KIND_TRAINING), (2, dd.KIND_TRAINING)]
    assert [r for r, _ in ledger_at_unmask] == [1, 1, 2]
    for (_, ledger), release in zip(ledger_at_unmask, expected, strict=True):
        assert [(e["round"], e["kind"]) for e in ledger if e["kind"].startswith("distributed")][-1] == release
    events = server_ledger(run_dir)
    releases = [e for e in events if e["kind"].startswith("distributed")]
    # once each (the loop does not write them a second time), round 2's included: it stays counted
    assert [(e["round"], e["kind"]) for e in releases] == expected
    (abort,) = [e for e in events if e["kind"] == ABORT_EVENT]
    assert abort["round"] == 2 and "unmask" in abort["reason"] and "ε stays counted" in abort["released"]
    assert f"{releases[-1]['epsilon']:.6g}" in abort["released"]
    # fedrec audit counts round 2 and names the accounted release of the aborted sum by its line
    result = audit_run(run_dir, empirical=False)
    server = next(led for led in result.ledgers if led.owner == "server")
    assert server.trajectory[-1].round == 2
    assert server.trajectory[-1].pld == pytest.approx(releases[-1]["epsilon"], abs=0.01)
    (line,) = [dropout_text(d) for d in server.dropouts]
    release_line = next(i + 1 for i, e in enumerate(events) if (e["round"], e["kind"]) == expected[-1])
    assert "round 2" in line and f"its release (line {release_line}) was accounted" in line
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"].get(records.MODEL_KEPT) for r in rounds] == [None, 1]
    assert rounds[1]["central-privacy"]["epsilon"] == pytest.approx(releases[-1]["epsilon"])


def test_a_silo_sending_random_words_gets_each_sum_refused_and_the_run_stops_after_two(tmp_path):
    from common.secagg import ABORT_EVENT
    from common.storage import load_arrays

    # Arrange: node 2 answers every collect stage with random words; 4 rounds planned
    run_dir = tmp_path / "run"
    cfg = distributed_config(run_dir, **{"privacy.distributed.popularity": False, "num-server-rounds": 4})
    # Act
    run_federation(GarbageSecAggGrid(client_app, cfg, SILOS, liar=2), cfg)
    # Assert: both sums landed in the guard band and were refused after being accounted; the run
    # stopped after round 2 instead of spending rounds 3 and 4 on sums that reveal nothing
    events = server_ledger(run_dir)
    assert [e["round"] for e in events if e["kind"] == dd.KIND_TRAINING] == [1, 2]  # ε counted
    aborts = [e for e in events if e["kind"] == ABORT_EVENT]
    assert [a["round"] for a in aborts] == [1, 2]
    assert all("lie beyond ±S·r" in a["reason"] and "its ε stays counted" in a["released"] for a in aborts)
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"].get(records.MODEL_KEPT) for r in rounds] == [1, 1]
    state = json.loads((run_dir / "state.json").read_text())
    assert "the last 2 secure sums failed after their release was accounted" in state["stop-reason"]
    initial, final = load_arrays(run_dir / "initial.npz"), load_arrays(run_dir / "final.npz")
    assert all(np.array_equal(initial[k].numpy(), final[k].numpy()) for k in initial)  # no garbage reached the model
