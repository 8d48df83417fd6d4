"""A silo's personalized copy: what the fine-tune moves, how its epoch is chosen, its negatives, its settings."""

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

import common.personalization
import common.training
from client import personalize
from common import records
from common.config import AppConfig, PersonalizeSettings
from common.data.silo import SiloData
from common.data.split import UserSplit
from common.errors import ConfigError
from common.evaluation import PERSONALIZED, EvalProtocol, evaluation_sums
from common.models import MF, build_model
from common.personalization import fine_tune, tuned_parameters
from common.run_config import load_default_run_config

NUM_USERS, NUM_ITEMS, DIM = 8, 30, 4


def _split() -> UserSplit:
    # User u trained on items 3u .. 3u+5 (mod 30); validation item 3u+6, test item 3u+7; negatives fixed.
    users = np.repeat(np.arange(NUM_USERS), 6)
    items = np.concatenate([(3 * u + np.arange(6)) % NUM_ITEMS for u in range(NUM_USERS)])
    val = (3 * np.arange(NUM_USERS) + 6) % NUM_ITEMS
    test = (3 * np.arange(NUM_USERS) + 7) % NUM_ITEMS
    negatives = np.stack([(3 * u + 10 + np.arange(12)) % NUM_ITEMS for u in range(NUM_USERS)])
    return UserSplit(
        num_items=NUM_ITEMS,
        train_user=users.astype(np.int64),
        train_item=items.astype(np.int64),
        val_item=val.astype(np.int64),
        test_item=test.astype(np.int64),
        val_negatives=negatives.astype(np.int64),
        test_negatives=negatives.astype(np.int64),
        user_global_idx=np.arange(NUM_USERS, dtype=np.int64),
    )


def _cfg(**personalize: object) -> AppConfig:
    run_config = load_default_run_config()
    run_config.update({"eval.k": 5, "data.eval-negatives": 12, "train.batch-size": 8, "train.lr": 0.05})
    run_config.update({"personalize.enabled": True, "personalize.lr": 0.05, "personalize.epochs": 4})
    run_config.update({f"personalize.{key}": value for key, value in personalize.items()})
    return AppConfig.from_run_config(run_config)


def _model() -> MF:
    torch.manual_seed(0)
    model = build_model("mf", NUM_USERS, NUM_ITEMS, DIM)
    assert isinstance(model, MF)
    return model


def _fine_tune(cfg: AppConfig, model: MF, seed: int = 0):
    return fine_tune(
        model, _split(), cfg.personalize, cfg.train, k=cfg.eval.k, rng=np.random.default_rng(seed), device=torch.device("cpu")
    )


def _full_train_loss(model: torch.nn.Module, split: UserSplit, cfg: AppConfig) -> float:
    # The silo's own training loss with one fixed set of negatives outside each user's training items.
    negatives = common.training.sample_train_negatives(
        common.training.train_item_keys(split), split.train_user, 4, NUM_ITEMS, np.random.default_rng(99)
    )
    items = torch.from_numpy(np.concatenate([split.train_item[:, None], negatives], axis=1))
    with torch.no_grad():
        return float(common.training.batch_loss(model, torch.from_numpy(split.train_user), items, cfg.train).mean())  # type: ignore[arg-type]


def test_fine_tune_lowers_the_silos_own_training_loss_and_leaves_the_model_alone():
    # Arrange: an untrained model, so any fitting of the training items shows in the loss.
    cfg = _cfg(params="all", epochs=4)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Act
    result = _fine_tune(cfg, model)
    # Assert
    assert len(result.train_loss) == 4
    assert result.train_loss[-1] < result.train_loss[0]
    assert result.epoch > 0
    assert _full_train_loss(result.model, _split(), cfg) < _full_train_loss(model, _split(), cfg)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"fine_tune modified the caller's {name}"


@pytest.mark.parametrize(
    ("params", "moved"),
    [
        ("item-bias", {"item_bias.weight"}),
        ("items", {"item_embedding.weight", "item_bias.weight", "global_bias.value"}),
        ("all", {"item_embedding.weight", "item_bias.weight", "global_bias.value", "user_embedding.weight", "user_bias.weight"}),
    ],
)
def test_each_kind_moves_exactly_its_parameters(params, moved, monkeypatch):
    # Arrange: validation that improves every epoch, so the last epoch is kept.
    calls = iter(range(100))
    monkeypatch.setattr(common.personalization, "_val_user_hits", lambda *args: np.full(NUM_USERS, float(next(calls))))
    model = _model()
    # Act
    result = _fine_tune(_cfg(params=params, epochs=2), model)
    # Assert
    assert result.epoch == 2
    assert set(tuned_parameters(model, params)) == moved
    changed = {k for k, v in result.model.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert changed == moved


def test_the_epoch_kept_is_the_earliest_with_the_most_validation_hits():
    # Arrange
    cfg = _cfg(params="all", epochs=4)
    model = _model()
    split = _split()
    # Act
    result = _fine_tune(cfg, model)
    # Assert
    hits = result.val_hits
    assert len(hits) == 5  # epoch 0 (the model itself) and 4 fine-tune epochs
    assert hits[result.epoch] == max(hits)
    assert all(h < max(hits) for h in hits[: result.epoch])
    protocol = EvalProtocol(k=cfg.eval.k, full_ranking=False)
    kept = evaluation_sums(result.model, split, protocol, np.zeros(NUM_ITEMS), torch.device("cpu"))
    assert kept["val-hits@5"] == hits[result.epoch]
    assert hits[0] == evaluation_sums(model, split, protocol, np.zeros(NUM_ITEMS), torch.device("cpu"))["val-hits@5"]


def test_fine_tune_negatives_come_from_outside_each_users_training_items(monkeypatch):
    # Arrange: record every negative the fine-tune draws.
    drawn: list[tuple[np.ndarray, np.ndarray]] = []
    real = common.training.sample_train_negatives

    def spy(keys, users, k, num_items, rng, high=None):
        negatives = real(keys, users, k, num_items, rng, high)
        drawn.append((users.copy(), negatives.copy()))
        return negatives

    monkeypatch.setattr(common.training, "sample_train_negatives", spy)
    split = _split()
    trained = set(zip(split.train_user.tolist(), split.train_item.tolist(), strict=True))
    # Act
    _fine_tune(_cfg(epochs=3), _model())
    # Assert
    assert len(drawn) == 3
    pairs = {(int(u), int(i)) for users, negatives in drawn for u, row in zip(users, negatives, strict=True) for i in row}
    assert not pairs & trained
    # Held-out items are not training items, so they may be drawn (their identity never shapes training).
    assert {(u, int(split.val_item[u])) for u in range(NUM_USERS)} & pairs


def test_silo_keeps_its_personalized_model_and_reports_it_under_the_prefix(tmp_path):
    # Arrange
    cfg = _cfg(params="items", epochs=3)
    split = _split()
    data = SiloData(split, np.full(NUM_ITEMS, 0.2))
    model = _model()
    state = RecordDict()
    # Act
    sums = personalize.evaluate(model, cfg, data, partition_id=1, server_round=2, state=state, state_dir=tmp_path)
    # Assert
    plain = evaluation_sums(model, split, EvalProtocol(k=5, full_ranking_k=20), data.item_popularity, torch.device("cpu"))
    assert set(sums) == {PERSONALIZED + key for key in plain}
    assert records.STATE_PERSONALIZED in state.array_records
    assert (tmp_path / personalize.PERSONALIZED_FILE).is_file()
    loaded = _model()
    assert personalize.personalized_model(state, loaded)
    again = evaluation_sums(loaded, split, EvalProtocol(k=5, full_ranking_k=20), data.item_popularity, torch.device("cpu"))
    assert {PERSONALIZED + key: value for key, value in again.items()} == sums
    assert not personalize.personalized_model(RecordDict(), _model())


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"personalize.epochs": 0}, "personalize.epochs"),
        ({"personalize.lr": 0.0}, "personalize.lr"),
        ({"personalize.params": "users"}, "personalize.params"),
        ({"personalize.enabled": "yes"}, "personalize.enabled"),
        ({"personalize.method": "fedrep"}, "personalize.method"),
        ({"personalize.prox": -0.1}, "personalize.prox"),
        ({"personalize.margin": -1.0}, "personalize.margin"),
        ({"personalize.enabled": True, "personalize.params": "item-bias", "model.name": "neumf"}, "personalize.params"),
    ],
)
def test_bad_personalize_settings_are_refused_naming_the_key(override, key):
    # Arrange
    run_config = load_default_run_config()
    run_config.update(override)
    # Act / Assert
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        AppConfig.from_run_config(run_config)


def test_defaults_leave_personalization_off():
    # Arrange / Act
    cfg = AppConfig.from_run_config(load_default_run_config())
    # Assert
    assert cfg.personalize == PersonalizeSettings(
        enabled=False, params="all", epochs=5, lr=0.002, method="fine-tune", prox=0.1, margin=0.0
    )
