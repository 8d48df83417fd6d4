"""Under distributed DP (DP-FedAvg) a silo refits its users' rows against the table it evaluates."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from client import distributed, rounds, silo, state
from client.distributed import fit_user_rows, refit_user_rows
from tests.server.test_distributed_round import _cfg, _toy

STEPS = {"privacy.distributed.user-steps": 5, "privacy.distributed.user-lr": 0.1}


def _session(cfg, split, model, server_round=3):
    return SimpleNamespace(cfg=cfg, model=model, data=SimpleNamespace(split=split), partition_id=0,
                           server_round=server_round, context=SimpleNamespace(state=RecordDict()), store=None)  # fmt: skip


def test_the_refit_is_user_steps_on_the_evaluated_table_with_its_own_negatives_and_is_kept():
    split, mf = _toy()
    cfg = _cfg(**STEPS)
    session = _session(cfg, split, copy.deepcopy(mf))
    items_before = session.model.item_embedding.weight.detach().clone()
    # Act
    refit_user_rows(session)
    # Assert: the same Adam steps as fit_user_rows in its "evaluate" stream, the item table untouched
    expected = copy.deepcopy(mf)
    fit_user_rows(expected, split, cfg, 0, 3, "evaluate")
    got = session.model.user_embedding.weight.detach()
    torch.testing.assert_close(got, expected.user_embedding.weight.detach(), rtol=0, atol=0)
    assert not torch.equal(got, mf.user_embedding.weight)
    torch.testing.assert_close(session.model.item_embedding.weight.detach(), items_before, rtol=0, atol=0)
    # the evaluate stream's negatives are not the training message's of the same round
    train_phase = copy.deepcopy(mf)
    fit_user_rows(train_phase, split, cfg, 0, 3)
    assert not torch.equal(train_phase.user_embedding.weight, got)
    # the node state holds the refit rows: the next message (and serving) starts from them
    fresh = copy.deepcopy(mf)
    assert state.restore_user_params(session.context.state, fresh)
    torch.testing.assert_close(fresh.user_embedding.weight.detach(), got, rtol=0, atol=0)


@pytest.mark.parametrize(("algorithm", "called"), [("fedavg", "refit"), ("als", "als")])
def test_evaluate_puts_each_users_rows_on_the_evaluated_model_first(monkeypatch, algorithm, called):
    split, mf = _toy()
    session = _session(_cfg(**STEPS, **{"privacy.distributed.algorithm": algorithm}), split, mf)
    calls = []

    class Scored(Exception):
        pass

    def evaluate_users(*_):
        calls.append("evaluate")
        raise Scored

    monkeypatch.setattr(distributed, "refit_user_rows", lambda s: calls.append("refit"))
    monkeypatch.setattr(distributed, "als_user_rows", lambda s: calls.append("als"))
    monkeypatch.setattr(silo, "evaluate_users", evaluate_users)
    # Act
    with pytest.raises(Scored):
        rounds.evaluate(session)  # type: ignore[arg-type]
    # Assert: the rows are put on the evaluated table before it is scored, once
    assert calls == [called, "evaluate"]


def test_no_user_steps_leaves_the_rows_as_they_are():
    split, mf = _toy()
    session = _session(_cfg(**{"privacy.distributed.user-steps": 0}), split, copy.deepcopy(mf))
    refit_user_rows(session)
    np.testing.assert_array_equal(session.model.user_embedding.weight.detach().numpy(),
                                  mf.user_embedding.weight.detach().numpy())  # fmt: skip
