"""Node state: a silo's split and its users' private parameters survive between messages."""

import numpy as np
import torch
from flwr.app import RecordDict

from client.state import load_silo_data, restore_user_params, save_silo_data, save_user_params
from common import records
from common.data.silo import SiloData
from common.data.split import UserSplit
from common.models import build_model


def _silo_data() -> SiloData:
    # Two users, five items: user 0 trained on items 1 and 2, user 1 on item 3.
    split = UserSplit(
        num_items=5,
        train_user=np.array([0, 0, 1], dtype=np.int64),
        train_item=np.array([1, 2, 3], dtype=np.int64),
        val_item=np.array([4, 0], dtype=np.int64),
        test_item=np.array([3, 1], dtype=np.int64),
        val_negatives=np.array([[0, 3], [1, 2]], dtype=np.int64),
        test_negatives=np.array([[4, 0], [2, 4]], dtype=np.int64),
        user_global_idx=np.array([7, 9], dtype=np.int64),
    )
    # 3 training interactions over 2 users: items 1, 2 and 3 have 1/2 each.
    return SiloData(split, np.array([0.0, 0.5, 0.5, 0.5, 0.0]))


def _fill_private(model: torch.nn.Module, start: float) -> None:
    with torch.no_grad():
        model.user_embedding.weight.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3) + start)
        model.user_bias.weight.copy_(torch.tensor([[start], [start + 1.0]]))


def test_silo_data_round_trips_through_node_state():
    # Arrange
    data = _silo_data()
    state = RecordDict()
    # Act
    save_silo_data(state, data)
    loaded = load_silo_data(state)
    # Assert
    assert loaded is not None
    assert loaded.split.num_items == 5
    for name in ("train_user", "train_item", "val_item", "test_item", "val_negatives", "test_negatives",
                 "user_global_idx"):
        np.testing.assert_array_equal(getattr(loaded.split, name), getattr(data.split, name), err_msg=name)
        assert getattr(loaded.split, name).dtype == np.int64, name
    np.testing.assert_array_equal(loaded.item_popularity, [0.0, 0.5, 0.5, 0.5, 0.0])


def test_a_fresh_node_has_no_silo_data():
    # Act / Assert
    assert load_silo_data(RecordDict()) is None


def test_user_params_round_trip_through_node_state_and_only_they_are_stored():
    # Arrange: the saved model's user rows are 0..5 and its user biases 0 and 1.
    saved = build_model("mf", num_users=2, num_items=5, dim=3)
    _fill_private(saved, start=0.0)
    fresh = build_model("mf", num_users=2, num_items=5, dim=3)
    _fill_private(fresh, start=100.0)
    items_before = fresh.item_embedding.weight.detach().clone()
    state = RecordDict()
    # Act
    save_user_params(state, saved)
    restored = restore_user_params(state, fresh)
    # Assert
    assert restored is True
    assert set(state.array_records[records.STATE_USER_PARAMS]) == {"user_embedding.weight", "user_bias.weight"}
    np.testing.assert_array_equal(fresh.user_embedding.weight.detach().numpy(), [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(fresh.user_bias.weight.detach().numpy(), [[0.0], [1.0]])
    torch.testing.assert_close(fresh.item_embedding.weight.detach(), items_before)  # shared part untouched


def test_restore_user_params_returns_false_on_an_empty_state_and_leaves_the_model():
    # Arrange
    model = build_model("mf", num_users=2, num_items=5, dim=3)
    _fill_private(model, start=100.0)
    # Act
    restored = restore_user_params(RecordDict(), model)
    # Assert
    assert restored is False
    np.testing.assert_array_equal(model.user_bias.weight.detach().numpy(), [[100.0], [101.0]])
