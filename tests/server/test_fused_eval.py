"""eval.fused: one exchange per round, the same metrics and models as two (in-process)."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from client.app import app as client_app
from common import records
from common.privacy.audit import audit_run
from common.run_config import load_default_run_config
from common.rundir import RunDir
from common.storage import load_arrays
from server.federation import run_federation
from server.metered_grid import MeteredGrid
from server.recorder import PENDING_ROUND, RunRecorder
from tests.fakes import LocalGrid, local_dp_run_config

NODES = 3


def _plain_config(run_dir: Path, rounds: int, **extra) -> dict:
    """A small run without DP whose silos keep durable state under the run (so it can resume)."""
    cfg = load_default_run_config()
    cfg.update(
        {
            "num-server-rounds": rounds,
            "run-dir": str(run_dir),
            "state-root": str(run_dir / "silos"),
            "data.synthetic.num-users": 240,
            "data.synthetic.num-items": 200,
            "data.synthetic.mean-interactions": 15,
            "model.dim": 8,
            **extra,
        }
    )
    return cfg


class _Exchanges:
    """Counts the round loop's exchanges and the message types in each."""

    def __init__(self, monkeypatch) -> None:
        self.kinds: list[list[str]] = []
        original = MeteredGrid.send_and_receive

        def send_and_receive(grid, messages, *, timeout=None):
            messages = list(messages)
            self.kinds.append(sorted(m.metadata.message_type for m in messages))
            return original(grid, messages, timeout=timeout)

        monkeypatch.setattr(MeteredGrid, "send_and_receive", send_and_receive)


class _Watched(LocalGrid):
    """A LocalGrid that shows ``hook`` every (instruction, reply) pair; ``hook`` may change the instruction."""

    def __init__(self, cfg: dict, hook=None, before=None, **kwargs) -> None:
        super().__init__(client_app, cfg, NODES, **kwargs)
        self.hook, self.before = hook, before

    def _run_node(self, wire: Message) -> Message:
        if self.before is not None:
            self.before(wire)
        reply = super()._run_node(wire)
        if self.hook is not None:
            self.hook(wire, reply)
        return reply


def _round(msg: Message) -> int:
    return int(msg.content.config_records[records.CONFIG][records.SERVER_ROUND])


def _run(cfg: dict) -> None:
    # Flower samples nodes with the global ``random``; the same order of replies in both
    # loops (fused: still evaluate-then-train sampling) gives sums added in the same order.
    random.seed(0)
    run_federation(LocalGrid(client_app, cfg, NODES), cfg)


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_arrays(a: Path, b: Path) -> None:
    x, y = load_arrays(a), load_arrays(b)
    assert list(x) == list(y)
    for k in x:
        np.testing.assert_array_equal(x[k].numpy(), y[k].numpy())


@pytest.mark.parametrize(
    ("rounds", "every", "extra", "unfused", "fused"),
    [
        (4, 1, {}, 8, 5),
        (4, 2, {}, 6, 5),
        # personalization: the silo's personal model is trained after it evaluated
        (3, 1, {"personalize.enabled": True, "personalize.method": "ditto"}, 6, 4),
    ],
    ids=["every-round", "every-2", "ditto"],
)
def test_fused_rounds_give_the_metrics_and_model_of_two_exchanges_with_fewer_exchanges(
    tmp_path, monkeypatch, rounds, every, extra, unfused, fused
):
    # unfused: a train exchange per round plus an evaluate exchange per evaluated round;
    # fused: a train exchange per round (carrying the previous round's evaluation) plus
    # the last round's evaluate exchange.
    runs = {}
    for flag in (False, True):
        run_dir = tmp_path / f"fused-{flag}"
        with monkeypatch.context() as m:
            exchanges = _Exchanges(m)
            _run(_plain_config(run_dir, rounds, **{"eval.every": every, "eval.fused": flag, **extra}))
        runs[flag] = (run_dir, exchanges.kinds)
    (plain, plain_kinds), (one, one_kinds) = runs[False], runs[True]
    assert len(plain_kinds) == unfused and len(one_kinds) == fused
    assert one_kinds[-1] == ["evaluate"] * NODES  # the last round's own evaluation
    assert all(kinds == ["train"] * NODES for kinds in one_kinds[:-1])  # evaluate instructions ride along
    a, b = _lines(plain), _lines(one)
    assert [r["round"] for r in b] == list(range(1, rounds + 1))
    for x, y in zip(a, b, strict=True):
        assert x["evaluate"] == y["evaluate"]  # the same sums of the same model, bit for bit
        assert x["train"]["train-loss"] == y["train"]["train-loss"]
        assert (x["rejected"], x["missing-nodes"]) == (y["rejected"], y["missing-nodes"]) == ([], [])
    evaluated = [r["round"] for r in b if r["evaluate"]]
    assert evaluated == [r for r in range(1, rounds + 1) if r % every == 0 or r == rounds]
    for r in range(1, rounds + 1):
        _same_arrays(RunDir(plain).checkpoint(r), RunDir(one).checkpoint(r))
    _same_arrays(RunDir(plain).final_model, RunDir(one).final_model)
    # one exchange fewer per evaluated round: fewer bytes too (the arrays travel once)
    assert sum(r["bytes-sent"] for r in b) < sum(r["bytes-sent"] for r in a)


def test_a_fused_train_message_carries_the_evaluate_instructions_of_the_previous_round(tmp_path):
    seen: list[tuple[Message, dict]] = []  # the reply's records as they left the silo
    cfg = _plain_config(tmp_path / "run", 2, **{"eval.fused": True})
    run_federation(_Watched(cfg, hook=lambda wire, reply: seen.append((wire, dict(reply.content)))), cfg)
    train_2 = [(w, r) for w, r in seen if w.metadata.message_type == "train" and _round(w) == 2]
    assert len(train_2) == NODES
    for wire, reply in train_2:  # round 1's evaluate instructions; the reply has both results
        assert wire.content.config_records[records.EVALUATE_CONFIG][records.SERVER_ROUND] == 1
        assert records.ARRAYS in reply
        sums = reply[records.EVALUATION_PREFIX + records.METRICS]
        assert sums[records.NUM_EXAMPLES] > 0 and "test-users" in sums
    train_1 = [r for w, r in seen if w.metadata.message_type == "train" and _round(w) == 1]
    assert len(train_1) == NODES
    assert all(not any(k.startswith(records.EVALUATION_PREFIX) for k in r) for r in train_1)


def test_a_silo_that_fails_a_fused_message_is_rejected_in_both_rounds(tmp_path):
    cfg = _plain_config(tmp_path / "run", 3, **{"eval.fused": True})

    def before(wire: Message) -> None:
        if wire.metadata.dst_node_id == 2 and _round(wire) == 2:
            wire.content.config_records[records.CONFIG][records.SERVER_ROUND] = "two"  # the silo raises on it

    run_federation(_Watched(cfg, before=before), cfg)
    rounds = _lines(tmp_path / "run")
    # round 1's evaluation and round 2's training came in node 2's one (failed) reply
    assert [n["node"] for n in rounds[0]["rejected"]] == [2]
    assert rounds[0]["rejected"][0]["reason"].startswith("evaluation: silo failed")
    assert [n["node"] for n in rounds[1]["rejected"]] == [2]
    assert rounds[0]["evaluate"]["silos"] == 2 and rounds[1]["train"]["silos"] == 2
    assert rounds[2]["rejected"] == [] and rounds[2]["evaluate"]["silos"] == NODES


def test_a_silo_missing_from_a_fused_exchange_is_missing_in_both_rounds(tmp_path):
    cfg = _plain_config(tmp_path / "run", 3, **{"eval.fused": True, "strategy.timeout": 0.01})
    run_federation(LocalGrid(client_app, cfg, NODES, drop=lambda node, msg: node == 3 and _round(msg) == 2), cfg)
    rounds = _lines(tmp_path / "run")
    assert rounds[0]["missing-nodes"] == [3] and rounds[1]["missing-nodes"] == [3]
    assert rounds[0]["evaluate"]["silos"] == 2 and rounds[1]["train"]["silos"] == 2
    assert rounds[2]["missing-nodes"] == []


@pytest.mark.parametrize("evaluation", ["withheld", "noisy"])
def test_fused_rounds_keep_the_release_policy_under_local_dp(tmp_path, evaluation):
    # What reaches the server per round is the unfused loop's: the same metrics keys,
    # the same releases (a noisy evaluation's beside the training's), ledgers that audit.
    lines = {}
    for flag in (False, True):
        run_dir = tmp_path / f"fused-{flag}"
        cfg = local_dp_run_config(
            run_dir, 3, **{"eval.fused": flag, "privacy.release.evaluation": evaluation,
                           "strategy.reject-opposed": False}  # noisy updates may point apart: not this test's subject
        )
        _run(cfg)
        lines[flag] = _lines(run_dir)
        assert not audit_run(run_dir, empirical=False).problems
    for x, y in zip(lines[False], lines[True], strict=True):
        assert x["round"] == y["round"] and sorted(x["evaluate"]) == sorted(y["evaluate"])
        assert sorted(x["train"]) == sorted(y["train"]) and "train-loss" not in y["train"]
        assert [(e["kind"], e["owner"]) for e in x["privacy"]] == [(e["kind"], e["owner"]) for e in y["privacy"]]
        assert x["rejected"] == y["rejected"] == []
    if evaluation == "withheld":
        assert all(r["evaluate"] == {"withheld-silos": NODES} for r in lines[True])
    else:
        assert all(r["evaluate"]["silos"] == NODES for r in lines[True])
        assert all(sum(e["kind"] != "dp-sgd" for e in r["privacy"]) == NODES for r in lines[True])


class _ServerKilled(Exception):
    pass


@pytest.mark.parametrize("replies_before_kill", [0, 2])
def test_a_fused_run_killed_between_training_and_evaluation_resumes_to_the_same_run(
    tmp_path, monkeypatch, replies_before_kill
):
    # The server dies in round 3's exchange, which also carries round 2's evaluation: round 2
    # is trained and checkpointed (pending-round.json) but not in metrics.jsonl; some silos
    # may already have evaluated round 2 and trained round 3. The resumed run must write
    # what the uninterrupted one wrote.
    # Flower samples nodes with the global ``random``, whose state a resumed run does not
    # share: every node in a fixed order, so that sums are added in the same order.
    monkeypatch.setattr(random, "sample", lambda population, k: sorted(population)[:k])
    straight = tmp_path / "straight"
    _run(_plain_config(straight, 4, **{"eval.fused": True}))

    run = tmp_path / "run"
    cfg = _plain_config(run, 4, **{"eval.fused": True})
    count = {"n": 0}

    def hook(wire: Message, reply: Message) -> None:
        if _round(wire) == 3:
            if count["n"] == replies_before_kill:
                raise _ServerKilled
            count["n"] += 1

    with pytest.raises(_ServerKilled):
        run_federation(_Watched(cfg, hook=hook), cfg)
    assert [r["round"] for r in _lines(run)] == [1]
    assert json.loads((run / PENDING_ROUND).read_text())["round"] == 2
    resumed = {**cfg, "resume": True}
    run_federation(LocalGrid(client_app, resumed, NODES), resumed)

    a, b = _lines(straight), _lines(run)
    assert [r["round"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x["evaluate"] == y["evaluate"] and x["train"]["train-loss"] == y["train"]["train-loss"]
    _same_arrays(RunDir(straight).final_model, RunDir(run).final_model)


def test_a_stale_pending_round_is_ignored_on_resume(tmp_path):
    run = tmp_path / "run"
    cfg = _plain_config(run, 2, **{"eval.fused": True})
    _run(cfg)
    assert json.loads((run / PENDING_ROUND).read_text())["round"] == 1  # completed since
    point = RunRecorder(RunDir(run)).resume({**cfg, "resume": True, "num-server-rounds": 3})
    assert point.last_round == 2 and point.pending is None


def test_deploy_local_turns_fused_rounds_on_unless_told_otherwise(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    base = ["deploy", "local", "--silos", "2", "--rounds", "3", "--print-commands", "--run-dir", str(tmp_path / "r")]
    on = CliRunner().invoke(app, base)
    off = CliRunner().invoke(app, [*base, "-c", "eval.fused=false"])
    assert on.exit_code == 0 and off.exit_code == 0, on.output + off.output
    assert "eval.fused = true" in on.output
    assert "eval.fused" not in off.output  # the default of the run config: unfused
