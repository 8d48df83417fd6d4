"""Ditto personalization: the selection margin, the personal model's proximal training, its mix, its state."""

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

import common.personalization
from client import personalize
from common import records
from common.data.silo import SiloData
from common.evaluation import PERSONALIZED, EvalProtocol, evaluation_sums
from common.personalization import MIX_WEIGHTS, ditto_select, ditto_train, keep, mixed
from common.storage import load_arrays
from common.training import train_epochs
from tests.client.test_personalization import NUM_ITEMS, NUM_USERS, _cfg, _model, _split
from tests.server.test_personalized_federation import _by_type

CPU = torch.device("cpu")


def _hits(*on: int, n: int = 10) -> np.ndarray:
    out = np.zeros(n)
    out[list(on)] = 1.0
    return out


def test_keep_takes_the_best_candidate_only_past_the_margin_in_paired_standard_errors():
    # Arrange: global hits users 0, 2 (2 hits). A: 0, 1, 2 (gain 1, 1 discordant user).
    # B: 1, 2, 3, 4 (gain 2; discordant users 0, 1, 3, 4 -> sqrt(4) = 2 standard-error units).
    g, a, b = _hits(0, 2), _hits(0, 1, 2), _hits(1, 2, 3, 4)
    # Act / Assert
    assert keep(g, [a, b], 0.0) == 2
    assert keep(g, [a, b], 0.9) == 2  # 2 > 0.9 * 2
    assert keep(g, [a, b], 1.0) == 0  # 2 > 1.0 * 2 fails; A (not the best) is not considered
    assert keep(g, [a, a.copy()], 0.0) == 1  # ties: the earliest candidate
    assert keep(g, [g.copy()], 0.0) == 0  # no gain: the global model
    assert keep(g, [], 0.0) == 0


def test_fine_tune_keeps_the_global_model_unless_the_gain_passes_the_margin(monkeypatch):
    # Arrange: epochs 0..2 hit 2, 3, 4 validation users; epoch 2 vs 0: gain 2, discordant 2 (sqrt 1.41).
    curve = iter([_hits(0, 1, n=NUM_USERS), _hits(0, 1, 2, n=NUM_USERS), _hits(0, 1, 2, 3, n=NUM_USERS)])
    monkeypatch.setattr(common.personalization, "_val_user_hits", lambda *args: next(curve))
    # Act
    loose = common.personalization.fine_tune(
        _model(), _split(), _cfg(epochs=2, margin=1.4).personalize, _cfg().train, k=5,
        rng=np.random.default_rng(0), device=CPU,
    )
    curve = iter([_hits(0, 1, n=NUM_USERS), _hits(0, 1, 2, n=NUM_USERS), _hits(0, 1, 2, 3, n=NUM_USERS)])
    strict = common.personalization.fine_tune(
        _model(), _split(), _cfg(epochs=2, margin=1.5).personalize, _cfg().train, k=5,
        rng=np.random.default_rng(0), device=CPU,
    )
    # Assert: 2 > 1.4 * 1.414 = 1.98 keeps epoch 2; 2 > 1.5 * 1.414 = 2.12 fails: the global model.
    assert loose.epoch == 2 and loose.val_hits == (2.0, 3.0, 4.0)
    assert strict.epoch == 0
    assert torch.equal(strict.model.item_bias.weight, _model().item_bias.weight)


def test_ditto_without_prox_is_plain_training_of_the_named_parameters():
    # Arrange: prox 0 and no earlier personal model: exactly train_epochs on a copy with the others frozen.
    cfg = _cfg(method="ditto", params="items", prox=0.0, lr=0.03)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _model()
    for name, parameter in expected.named_parameters():
        parameter.requires_grad_(not name.startswith("user_"))
    train = dataclasses.replace(cfg.train, lr=0.03)
    train_epochs(expected, _split(), train, epochs=cfg.train.local_epochs, rng=np.random.default_rng(5), device=CPU)
    # Act
    personal, stats = ditto_train(None, model, _split(), cfg.personalize, cfg.train, rng=np.random.default_rng(5), device=CPU)
    # Assert
    assert set(personal) == {"item_embedding.weight", "item_bias.weight", "global_bias.value"}
    for name, value in personal.items():
        assert torch.equal(value, expected.state_dict()[name]), name
    assert stats.num_steps == cfg.train.local_epochs * -(-len(_split().train_user) // cfg.train.batch_size)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"ditto_train modified the caller's {name}"


def test_ditto_prox_pulls_the_personal_model_toward_the_received_one_by_one_adam_step():
    # Arrange: the personal item biases sit 1.0 above the received model's; prox 1000 makes the
    # proximal gradient (2000 per bias) dominate the data gradient (< 10), so Adam's first step,
    # -lr · g / (|g| + eps), moves every bias by -lr: 1.0 -> 1.0 - 0.01 above the received value.
    cfg = _cfg(method="ditto", params="item-bias", prox=1000.0, lr=0.01)
    train = dataclasses.replace(cfg.train, batch_size=1000, local_epochs=1)
    model = _model()
    received = model.item_bias.weight.detach().clone()
    personal = {"item_bias.weight": received + 1.0}
    # Act
    out, stats = ditto_train(personal, model, _split(), cfg.personalize, train, rng=np.random.default_rng(0), device=CPU)
    # Assert
    assert stats.num_steps == 1
    np.testing.assert_allclose((out["item_bias.weight"] - received).numpy(), 0.99, atol=1e-6)


def test_ditto_refuses_a_personal_model_of_other_parameters():
    cfg = _cfg(method="ditto", params="item-bias")
    with pytest.raises(ValueError, match="personalize.params"):
        ditto_train({"item_embedding.weight": torch.zeros(NUM_ITEMS, 4)}, _model(), _split(), cfg.personalize,
                    cfg.train, rng=np.random.default_rng(0), device=CPU)


def test_mixed_interpolates_only_the_personal_parameters():
    # Arrange: global item biases 0 (MF's init), personal ones 4.
    model = _model()
    personal = {"item_bias.weight": torch.full((NUM_ITEMS, 1), 4.0)}
    # Act
    out = mixed(model, personal, 0.25)
    # Assert: 0.25 · 4 + 0.75 · 0 = 1; everything else is the model's.
    assert torch.equal(out.item_bias.weight, torch.full((NUM_ITEMS, 1), 1.0))
    for name, value in model.state_dict().items():
        if name != "item_bias.weight":
            assert torch.equal(out.state_dict()[name], value), name
    assert torch.equal(model.item_bias.weight, torch.zeros(NUM_ITEMS, 1))


def test_ditto_select_keeps_the_earliest_best_mix_past_the_margin(monkeypatch):
    # Arrange: β = 0, 0.25, 0.5, 0.75, 1 hit 2, 3, 5, 5, 4 validation users.
    curves = [_hits(0, 1, n=8), _hits(0, 1, 2, n=8), _hits(0, 1, 2, 3, 4, n=8), _hits(0, 1, 2, 3, 5, n=8),
              _hits(0, 1, 4, 5, n=8)]
    personal = {"item_bias.weight": torch.full((NUM_ITEMS, 1), 4.0)}
    for margin, weight in ((0.0, 0.5), (1.8, 0.0)):  # gain 3 over 3 discordant users: 3 > 1.8·√3 = 3.12 fails
        calls = iter(curves)
        monkeypatch.setattr(common.personalization, "_val_user_hits", lambda *args, calls=calls: next(calls))
        # Act
        result = ditto_select(_model(), personal, _split(), _cfg(margin=margin).personalize, k=5, device=CPU)
        # Assert
        assert result.weight == weight
        assert result.val_hits == (2.0, 3.0, 5.0, 5.0, 4.0)
        assert torch.equal(result.model.item_bias.weight, torch.full((NUM_ITEMS, 1), 4.0 * weight))
    assert MIX_WEIGHTS == (0.25, 0.5, 0.75, 1.0)


def test_silo_keeps_its_personal_model_in_state_and_on_disk_and_serves_the_mix(tmp_path):
    # Arrange
    cfg = _cfg(method="ditto", params="items", prox=0.01, lr=0.05)
    split = _split()
    data = SiloData(split, np.full(NUM_ITEMS, 0.2))
    model = _model()
    state = RecordDict()
    # Act: two rounds of the personal model, then an evaluation on a fresh node reading the state dir.
    personalize.train(model, cfg, data, 0, 1, state, tmp_path)
    first = {k: v.clone() for k, v in state.array_records[personalize.STATE_PERSONAL].to_torch_state_dict().items()}
    personalize.train(model, cfg, data, 0, 2, state, tmp_path)
    second = state.array_records[personalize.STATE_PERSONAL].to_torch_state_dict()
    fresh = RecordDict()
    sums = personalize.evaluate(model, cfg, data, 0, 2, fresh, tmp_path)
    # Assert: round 2 continued from round 1's personal model; the file is what the node holds.
    assert set(first) == {"item_embedding.weight", "item_bias.weight", "global_bias.value"}
    assert not torch.equal(first["item_embedding.weight"], second["item_embedding.weight"])
    on_disk = load_arrays(tmp_path / personalize.PERSONAL_FILE)
    assert all(np.array_equal(on_disk[k].numpy(), v.numpy()) for k, v in second.items())
    assert personalize.STATE_PERSONAL in fresh.array_records  # restored from the state directory
    kept = _model()
    assert personalize.personalized_model(fresh, kept)
    plain = evaluation_sums(kept, split, EvalProtocol(k=5, full_ranking_k=20), data.item_popularity, CPU)
    assert {PERSONALIZED + key: value for key, value in plain.items()} == sums
    assert (tmp_path / personalize.PERSONALIZED_FILE).is_file()


@pytest.fixture(scope="module")
def ditto_runs(tmp_path_factory):
    from tests.conftest import small_run_config
    from tests.server.test_personalized_federation import _run

    tmp = tmp_path_factory.mktemp("ditto")
    config = small_run_config.__wrapped__(tmp) | {"personalize.method": "ditto", "personalize.prox": 0.01}
    return {on: _run(config, tmp, f"on-{on}", on) for on in (False, True)}


def test_ditto_run_sends_the_same_arrays_as_a_run_without_personalization(ditto_runs):
    # Arrange
    off, on = _by_type(ditto_runs[False][0], "train"), _by_type(ditto_runs[True][0], "train")
    # Assert: bit-identical train replies; every silo trained a personal model that differs from the global.
    assert len(off) == len(on) == 4
    for a, b in zip(off, on, strict=True):
        assert set(b.content.array_records) == {records.ARRAYS}
        arrays_a, arrays_b = a.content.array_records[records.ARRAYS], b.content.array_records[records.ARRAYS]
        assert set(arrays_a) == set(arrays_b)
        for name in arrays_a:
            assert np.array_equal(arrays_a[name].numpy(), arrays_b[name].numpy()), name
    final = load_arrays(ditto_runs[True][2] / "final.npz")
    for ctx in ditto_runs[True][1].contexts.values():
        personal = ctx.state.array_records[personalize.STATE_PERSONAL]
        assert not np.array_equal(personal["item_embedding.weight"].numpy(), final["item_embedding.weight"].numpy())
    evaluated = _by_type(ditto_runs[True][0], "evaluate")
    assert all(PERSONALIZED + "test-hits@10" in r.content.metric_records[records.METRICS] for r in evaluated)
