"""Tests of the recommenders' private/shared split, scoring and local training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import AppConfig, TrainSettings
from common.data.schema import Interactions
from common.data.split import UserSplit, leave_one_out
from common.data.synthetic import SyntheticSpec, generate_synthetic
from common.models import (
    MF,
    NeuMF,
    Recommender,
    build_model,
    load_partial_state,
    private_state,
    shared_state,
)
from common.run_config import load_default_run_config
from common.training import sample_train_negatives, train_epochs, train_item_keys

NUM_USERS, NUM_ITEMS, DIM = 7, 11, 4
MODELS = ["mf", "neumf"]


def _model(name: str, seed: int = 0) -> Recommender:
    torch.manual_seed(seed)
    return build_model(name, NUM_USERS, NUM_ITEMS, DIM, mlp_layers=(8, 4))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def default_train() -> TrainSettings:
    return AppConfig.from_run_config(load_default_run_config()).train


@pytest.fixture(scope="module")
def small_split() -> UserSplit:
    spec = SyntheticSpec(num_users=200, num_items=200, mean_interactions=20, seed=1)
    return leave_one_out(generate_synthetic(spec), num_negatives=20, seed=0)


@pytest.mark.parametrize("name", MODELS)
def test_private_and_shared_state_split_by_user_prefix(name: str) -> None:
    # Arrange
    model = _model(name)
    # Act
    shared, private = shared_state(model), private_state(model)
    # Assert
    assert shared and private
    assert not any(k.startswith("user_") for k in shared)
    assert all(k.startswith("user_") for k in private)
    assert set(shared) | set(private) == set(model.state_dict())
    assert not set(shared) & set(private)
    assert all(v.shape[0] == NUM_USERS for v in private.values())


@pytest.mark.parametrize("name", MODELS)
def test_states_are_detached_copies(name: str) -> None:
    # Arrange
    model = _model(name)
    shared = shared_state(model)
    key = next(iter(shared))
    before = model.state_dict()[key].clone()
    # Act
    shared[key].add_(1.0)
    # Assert
    torch.testing.assert_close(model.state_dict()[key], before)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("private", [False, True])
def test_load_partial_state_round_trip(name: str, private: bool) -> None:
    # Arrange
    source, target = _model(name, seed=1), _model(name, seed=2)
    state = private_state(source) if private else shared_state(source)
    untouched = shared_state(target) if private else private_state(target)
    # Act
    load_partial_state(target, state, private=private)
    # Assert
    loaded = private_state(target) if private else shared_state(target)
    other = shared_state(target) if private else private_state(target)
    assert loaded.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(loaded[k], state[k])
    for k in untouched:
        torch.testing.assert_close(other[k], untouched[k])


@pytest.mark.parametrize("name", MODELS)
def test_load_partial_state_rejects_missing_key(name: str) -> None:
    # Arrange
    model = _model(name)
    state = shared_state(model)
    missing = sorted(state)[0]
    del state[missing]
    # Act / Assert
    with pytest.raises(ValueError, match=f"missing \\['{missing}'\\]"):
        load_partial_state(model, state, private=False)


@pytest.mark.parametrize("name", MODELS)
def test_load_partial_state_rejects_extra_key(name: str) -> None:
    # Arrange
    model = _model(name)
    state = {**private_state(model), **shared_state(model)}  # shared keys are extra
    # Act / Assert
    with pytest.raises(ValueError, match="unexpected"):
        load_partial_state(model, state, private=True)
    with pytest.raises(ValueError, match="bogus"):
        load_partial_state(
            model, {**shared_state(model), "bogus": torch.zeros(1)}, private=False
        )


@pytest.mark.parametrize("name", MODELS)
def test_load_partial_state_rejects_shape_mismatch(name: str) -> None:
    # Arrange: a model with a bigger catalogue has bigger item tables
    model = _model(name)
    torch.manual_seed(0)
    bigger = build_model(name, NUM_USERS, NUM_ITEMS + 1, DIM, mlp_layers=(8, 4))  # type: ignore[arg-type]
    before = shared_state(model)
    # Act / Assert
    with pytest.raises(ValueError, match="has shape"):
        load_partial_state(model, shared_state(bigger), private=False)
    for k, v in shared_state(model).items():  # nothing was half-loaded
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize("name", MODELS)
def test_forward_shape_and_score_all_agree(name: str) -> None:
    # Arrange
    model = _model(name)
    with torch.no_grad():  # make biases non-zero so they are exercised
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    users = torch.tensor([0, 3, 6])
    items = torch.tensor([[0, 1, 2, 10], [5, 5, 4, 3], [9, 8, 7, 6]])
    # Act
    with torch.no_grad():
        logits = model(users, items)
        full = model.score_all(users)
        every = model(users, torch.arange(NUM_ITEMS).expand(3, -1))
    # Assert
    assert logits.shape == (3, 4)
    assert full.shape == (3, NUM_ITEMS)
    torch.testing.assert_close(full, every)
    torch.testing.assert_close(torch.gather(full, 1, items), logits)


def test_mf_score_is_dot_plus_biases() -> None:
    # Arrange
    model = _model("mf")
    assert isinstance(model, MF)
    with torch.no_grad():
        model.user_bias.weight.fill_(0.5)
        model.item_bias.weight[3] = -2.0
        model.global_bias.value.fill_(0.25)
    # Act
    with torch.no_grad():
        score = model(torch.tensor([1]), torch.tensor([[3]]))[0, 0]
    # Assert
    expected = model.user_embedding.weight[1] @ model.item_embedding.weight[3] + 0.5 - 2.0 + 0.25
    torch.testing.assert_close(score, expected)


def test_neumf_rejects_odd_first_mlp_width() -> None:
    # Act / Assert
    with pytest.raises(ValueError, match="even"):
        NeuMF(NUM_USERS, NUM_ITEMS, DIM, mlp_layers=(7, 4))


@pytest.mark.parametrize("name", MODELS)
def test_training_lowers_the_loss(
    name: str, small_split: UserSplit, default_train: TrainSettings
) -> None:
    # Arrange
    torch.manual_seed(0)
    model = build_model(name, small_split.num_users, small_split.num_items, 16, (16, 8))  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=default_train.lr)
    # Act
    stats = [
        train_epochs(
            model,
            small_split,
            default_train,
            epochs=1,
            rng=rng,
            device=torch.device("cpu"),
            optimizer=optimizer,
        )
        for _ in range(4)
    ]
    # Assert
    assert stats[0].num_examples == small_split.num_train
    assert stats[0].num_steps == -(-small_split.num_train // default_train.batch_size)
    losses = [st.mean_loss for st in stats]
    assert np.all(np.isfinite(losses))
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 0.98 * losses[0]


def test_train_negatives_never_hit_the_users_training_items(rng: np.random.Generator) -> None:
    # Arrange
    spec = SyntheticSpec(num_users=50, num_items=100, mean_interactions=30, seed=2)
    split = leave_one_out(generate_synthetic(spec), num_negatives=10, seed=0)
    keys = train_item_keys(split)
    # Act
    negatives = sample_train_negatives(keys, split.train_user, 8, split.num_items, rng)
    # Assert
    assert negatives.shape == (split.num_train, 8)
    query = split.train_user[:, None] * split.num_items + negatives
    assert not np.isin(query, keys).any()
    assert negatives.min() >= 0 and negatives.max() < split.num_items


def test_train_negatives_can_be_the_held_out_items(rng: np.random.Generator) -> None:
    # Arrange: "a" saw items 0..9 (train 0..7, val 8, test 9); "b" adds 10..12
    rows = [("a", f"i{i}", i) for i in range(10)]
    rows += [("b", f"i{i}", i) for i in (10, 11, 12)]
    users, items, times = zip(*rows, strict=True)
    data = Interactions.from_external_ids(
        list(users), list(items), np.array(times), source="test"
    )
    split = leave_one_out(data, num_negatives=2, seed=0)
    a = 0
    assert split.test_item[a] == 9 and split.val_item[a] == 8
    # Act
    negatives = sample_train_negatives(
        train_item_keys(split), np.full(400, a), 5, split.num_items, rng
    )
    # Assert: only non-train items, and every one of them (held-out ones included)
    assert set(np.unique(negatives).tolist()) == {8, 9, 10, 11, 12}
