"""personalize.method = "recency": each user's row shifted toward its latest training items, chosen on validation."""

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from client import personalize
from common import records
from common.config import AppConfig
from common.data.silo import SiloData
from common.data.split import UserSplit
from common.errors import ConfigError
from common.evaluation import PERSONALIZED
from common.models import MF, build_model
from common.personalization import RECENT_ITEMS, RECENT_WEIGHTS, recency_select, recent_profile
from common.recency import ITEM_ROWS, RECENT_ITEMS_KEY, RECENT_WEIGHT_KEY, USER_ROWS, history_profile
from common.run_config import load_default_run_config
from common.storage import load_arrays

CPU = torch.device("cpu")


def _split(train_user, train_item, num_items, val, negatives, order="time") -> UserSplit:
    n = len(val)
    return UserSplit(
        num_items=num_items,
        train_user=np.asarray(train_user, dtype=np.int64),
        train_item=np.asarray(train_item, dtype=np.int64),
        val_item=np.asarray(val, dtype=np.int64),
        test_item=np.asarray(val, dtype=np.int64),
        val_negatives=np.asarray(negatives, dtype=np.int64),
        test_negatives=np.asarray(negatives, dtype=np.int64),
        user_global_idx=np.arange(n, dtype=np.int64),
        order=order,
    )


def test_the_profile_is_the_mean_unit_row_of_each_users_last_items_in_their_own_order():
    # Rows of users 0 and 1 interleaved; user 0's rows in order: items 0, 1, 2; user 1's: 3, 0; user 2 has none.
    split = _split([0, 1, 0, 1, 0], [0, 3, 1, 0, 2], 4, val=[3, 1, 1], negatives=[[1], [2], [3]])
    rows = np.array([[2.0, 0.0], [0.0, 3.0], [4.0, 4.0], [0.0, 0.0]])  # item 3's row has norm 0
    s = np.sqrt(0.5)
    np.testing.assert_allclose(recent_profile(split, rows, 1), [[s, s], [1.0, 0.0], [0.0, 0.0]])
    # Last two of user 0: items 1 and 2 -> ((0, 1) + (s, s)) / 2; user 1: items 3 (zero row) and 0 -> (1, 0) / 2.
    np.testing.assert_allclose(recent_profile(split, rows, 2), [[s / 2, (1 + s) / 2], [0.5, 0.0], [0.0, 0.0]])
    # More than a user has: the mean of all of them.
    np.testing.assert_allclose(recent_profile(split, rows, 10)[0], [(1 + s) / 3, (1 + s) / 3])
    with pytest.raises(ValueError, match="items must be >= 1"):
        recent_profile(split, rows, 0)


def _taste_model_and_split(order: str = "time") -> tuple[MF, UserSplit]:
    """Items 0..7 on a circle; every user's latest training item sits next to its validation item.

    The users' own rows and all biases are 0, so the global model scores every item 0
    (ties count against the held-out item: no hit at k = 1); a shift toward the latest
    item scores the validation item (45° from it) above the negatives (90°, 180°, 225°).
    """
    angles = np.arange(8) * np.pi / 4
    model = build_model("mf", 4, 8, 2)
    assert isinstance(model, MF)
    with torch.no_grad():
        model.item_embedding.weight.copy_(torch.tensor(np.c_[np.cos(angles), np.sin(angles)], dtype=torch.float32))
        model.user_embedding.weight.zero_()
        model.user_bias.weight.zero_()
        model.item_bias.weight.zero_()
    # User u: trained on the item opposite its validation item first, its validation item's neighbour last.
    val = np.array([0, 2, 4, 6])
    users = np.repeat(np.arange(4), 2)
    items = np.stack([(val + 4) % 8, (val + 1) % 8], axis=1).ravel()
    negatives = np.stack([(v + np.array([3, 5, 6])) % 8 for v in val])  # never trained on
    return model, _split(users, items, 8, val, negatives, order)


def _cfg(**personalize: object) -> AppConfig:
    run_config = load_default_run_config()
    run_config.update({"eval.k": 1, "data.eval-negatives": 3, "personalize.enabled": True, "personalize.method": "recency"})
    run_config.update({f"personalize.{key}": value for key, value in personalize.items()})
    return AppConfig.from_run_config(run_config)


def test_recency_keeps_the_smallest_shift_toward_the_latest_item_that_wins_validation_and_leaves_the_model_alone():
    model, split = _taste_model_and_split()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = recency_select(model, split, _cfg().personalize, k=1, device=CPU)
    # Global: every score is 0, ties count against the validation item -> no hit. m = 1 (the neighbour
    # of the validation item): the validation item scores β·cos(π/4) > the negatives' (cos ≥ 3π/4 away)
    # -> 4 hits at every β > 0; the grid's first such candidate is (1, 0.5).
    assert (result.items, result.weight) == (RECENT_ITEMS[0], RECENT_WEIGHTS[0])
    assert result.val_hits[0] == 0 and result.val_hits[1] == 4
    assert len(result.val_hits) == 1 + len(RECENT_ITEMS) * len(RECENT_WEIGHTS)
    rows = result.model.state_dict()[USER_ROWS].numpy()
    latest = model.state_dict()[ITEM_ROWS].numpy()[split.train_item[1::2]]
    np.testing.assert_allclose(rows, 0.5 * latest, atol=1e-6)  # 0 + β · the unit row of the latest item
    for name, value in result.model.state_dict().items():
        if name != USER_ROWS:
            assert torch.equal(value, before[name]), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} of the caller's model moved"


def test_recency_keeps_the_global_model_without_a_time_order_or_a_gain_past_the_margin():
    model, split = _taste_model_and_split(order="random")
    result = recency_select(model, split, _cfg().personalize, k=1, device=CPU)
    assert (result.items, result.weight, result.val_hits) == (0, 0.0, (0.0,))
    # 4 users, 4 discordant: a gain of 4 hits does not pass 2·√4 = 4.
    model, split = _taste_model_and_split()
    result = recency_select(model, split, _cfg(margin=2.0).personalize, k=1, device=CPU)
    assert (result.items, result.weight) == (0, 0.0)
    assert torch.equal(result.model.state_dict()[USER_ROWS], model.state_dict()[USER_ROWS])


def test_a_silo_with_recency_keeps_and_reports_the_shifted_copy(tmp_path):
    model, split = _taste_model_and_split()
    cfg = _cfg()
    data = SiloData(split=split, item_popularity=np.ones(8))
    state = RecordDict()
    sums = personalize.evaluate(model, cfg, data, 0, 4, state, tmp_path)
    assert sums[PERSONALIZED + "val-hits@1"] == 4.0 and sums[PERSONALIZED + "test-hits@1"] == 4.0
    kept = state.array_records[records.STATE_PERSONALIZED].to_torch_state_dict()
    assert not torch.equal(kept[USER_ROWS], model.state_dict()[USER_ROWS])
    assert (tmp_path / personalize.PERSONALIZED_FILE).exists()


def test_recency_is_refused_for_a_model_without_mfs_rows():
    run_config = load_default_run_config()
    run_config.update({"model.name": "neumf", "personalize.enabled": True, "personalize.method": "recency"})
    with pytest.raises(ConfigError, match='personalize.method: "recency" .*neumf'):
        AppConfig.from_run_config(run_config)


def test_the_kept_shift_is_stored_beside_the_copy_and_loading_the_copy_ignores_it(tmp_path):
    model, split = _taste_model_and_split()
    state = RecordDict()
    personalize.evaluate(model, _cfg(), SiloData(split, np.ones(8)), 0, 4, state, tmp_path)
    stored = load_arrays(tmp_path / personalize.PERSONALIZED_FILE)
    assert stored[RECENT_ITEMS_KEY].numpy().tolist() == [1.0] and stored[RECENT_WEIGHT_KEY].numpy().tolist() == [0.5]
    fresh, _ = _taste_model_and_split()
    assert personalize.personalized_model(state, fresh)
    np.testing.assert_array_equal(fresh.state_dict()[USER_ROWS].numpy(), stored[USER_ROWS].numpy())
    # a silo that keeps the global model stores no shift
    personalize.evaluate(model, _cfg(margin=2.0), SiloData(split, np.ones(8)), 0, 4, RecordDict(), tmp_path)
    assert RECENT_ITEMS_KEY not in load_arrays(tmp_path / personalize.PERSONALIZED_FILE)


def test_history_profile_is_the_mean_unit_row_of_the_last_items_in_the_order_given():
    rows = np.array([[2.0, 0.0], [0.0, 3.0], [4.0, 4.0]])
    s = np.sqrt(0.5)
    np.testing.assert_allclose(history_profile(np.array([2, 0, 1]), rows, 2), [0.5, 0.5])
    np.testing.assert_allclose(history_profile(np.array([0, 1, 2]), rows, 1), [s, s])
    np.testing.assert_allclose(history_profile(np.array([1]), rows, 5), [0.0, 1.0])


def test_a_hybrid_models_profile_is_made_of_the_item_vectors_it_scores_with():
    torch.manual_seed(0)
    model = build_model("hybrid-mf", 4, 8, 2, item_text=torch.randn(8, 3))
    _, split = _taste_model_and_split()
    with torch.no_grad():
        model.item_embedding.weight.copy_(torch.randn(8, 2))
    result = recency_select(model, split, _cfg().personalize, k=1, device=CPU)
    assert result.items  # on these users some shift wins validation
    vectors = model.item_vectors().detach().numpy()
    expected = model.user_embedding.weight.detach().numpy() + result.weight * recent_profile(split, vectors, result.items)
    np.testing.assert_allclose(result.model.state_dict()[USER_ROWS].numpy(), expected, rtol=1e-6, atol=1e-6)
