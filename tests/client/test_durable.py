"""A silo's durable state on disk: saved rounds, restore after a restart, readable errors."""

import json
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.durable import ACCOUNTANT, SiloStore, StateError, fingerprint
from common import records
from common.privacy.events import silo_owner

ACCOUNTANT_STATE = {"noise-multiplier": 1.2, "sample-rate": 0.25, "rounds": [1, 2, 3]}
ITEM_ROWS = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
USER_ROWS = np.array([[0.5, -0.5]], dtype=np.float32)


def _reply() -> RecordDict:
    return RecordDict(
        {
            records.ARRAYS: ArrayRecord({"item_embedding.weight": Array(ITEM_ROWS)}),
            records.METRICS: MetricRecord({records.NUM_EXAMPLES: 12, records.TRAIN_LOSS: 0.5}),
            records.PRIVACY: ConfigRecord({"epsilon": 1.5, "trained": True}),
        }
    )


def _state() -> RecordDict:
    return RecordDict(
        {
            records.STATE_USER_PARAMS: ArrayRecord({"user_embedding.weight": Array(USER_ROWS)}),
            records.STATE_PRIVACY: ConfigRecord(ACCOUNTANT_STATE),
        }
    )


def test_saved_round_gives_back_the_reply_that_was_sent(tmp_path):
    # Arrange
    store = SiloStore(tmp_path, partition_id=0)
    # Act
    store.save_round(3, _reply(), _state())
    again = store.saved_reply(3)
    # Assert
    assert again is not None
    sent = again.array_records[records.ARRAYS]["item_embedding.weight"].numpy()
    np.testing.assert_array_equal(sent, [[1.0, 2.0], [3.0, 4.0]])
    assert dict(again.metric_records[records.METRICS]) == {records.NUM_EXAMPLES: 12, records.TRAIN_LOSS: 0.5}
    assert dict(again.config_records[records.PRIVACY]) == {"epsilon": 1.5, "trained": True}
    assert store.last_round() == 3


def test_saved_reply_for_another_round_is_none(tmp_path):
    # Arrange
    store = SiloStore(tmp_path, partition_id=0)
    store.save_round(3, _reply(), _state())
    # Act / Assert
    assert store.saved_reply(2) is None
    assert store.saved_reply(4) is None
    assert SiloStore(tmp_path / "empty", partition_id=0).saved_reply(3) is None


def test_restore_fills_an_empty_node_state_from_disk(tmp_path):
    # Arrange: the silo saved round 1, then its SuperNode restarted with empty state.
    SiloStore(tmp_path, partition_id=0).save_round(1, _reply(), _state())
    state = RecordDict()
    # Act
    restored = SiloStore(tmp_path, partition_id=0).restore(state)
    # Assert
    assert restored is True
    np.testing.assert_array_equal(
        state.array_records[records.STATE_USER_PARAMS]["user_embedding.weight"].numpy(), [[0.5, -0.5]]
    )
    assert dict(state.config_records[records.STATE_PRIVACY]) == ACCOUNTANT_STATE
    assert records.STATE_LEDGER not in state  # no ledger was ever written


def test_restore_leaves_a_filled_node_state_alone(tmp_path):
    # Arrange
    store = SiloStore(tmp_path, partition_id=0)
    store.save_round(1, _reply(), _state())
    state = _state()
    state[records.STATE_PRIVACY] = ConfigRecord({"noise-multiplier": 9.0})
    # Act
    restored = store.restore(state)
    # Assert
    assert restored is False
    assert dict(state.config_records[records.STATE_PRIVACY]) == {"noise-multiplier": 9.0}


def test_a_corrupted_accountant_file_raises_state_error_naming_it(tmp_path):
    # Arrange
    store = SiloStore(tmp_path, partition_id=0)
    (tmp_path / ACCOUNTANT).write_text('{"noise-multiplier": 1.2,')
    # Act / Assert
    with pytest.raises(StateError, match=re.escape(str(tmp_path / ACCOUNTANT))):
        store.restore(RecordDict())


def test_fingerprint_changes_when_one_value_changes():
    # Arrange
    values = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    changed = values.copy()
    changed[1, 0] = 3.5
    # Act
    same_a = fingerprint(ArrayRecord({"w": Array(values)}))
    same_b = fingerprint(ArrayRecord({"w": Array(values.copy())}))
    other = fingerprint(ArrayRecord({"w": Array(changed)}))
    # Assert
    assert same_a == same_b
    assert other != same_a
    assert re.fullmatch(r"[0-9a-f]{16}", same_a)


def _accountant(uses: int, sigma: float = 1.5):
    from common.privacy.accounting import Accountant
    from common.privacy.events import MechanismUse

    acc = Accountant(
        owner=silo_owner(0),
        unit="user",
        population=100,
        sample_rate=0.1,
        steps_per_round=10,
        noise_multiplier=sigma,
        clip=1.0,
        delta=1e-5,
        delta_rule="default",
        accountant="pld",
        target_epsilon=0.0,
        released="shared parameters",
    )
    for r in range(1, uses + 1):
        acc.record(r, MechanismUse(sigma, 0.1, 10))
    return acc


def _state_with_ledger(rounds: int) -> RecordDict:
    """Node state of a silo that trained ``rounds`` rounds (accountant and ledger agree)."""
    from common.privacy.ledger import Chain

    chain = Chain(silo_owner(0))
    for r in range(1, rounds + 1):
        chain.append_release(_accountant(r).release(r))
    return RecordDict(
        {
            records.STATE_PRIVACY: ConfigRecord(_accountant(rounds).to_json()),
            records.STATE_LEDGER: ConfigRecord({records.LEDGER_LINES: chain.lines}),
        }
    )


def test_restore_drops_an_accountant_use_the_ledger_never_recorded(tmp_path):
    # Arrange: rounds 1-2 saved; round 3's accountant was written, then the silo stopped
    # before round 3's ledger line (the reply was never sent).
    store = SiloStore(tmp_path, partition_id=0)
    store.save_state(_state_with_ledger(2))
    (tmp_path / ACCOUNTANT).write_text(json.dumps(_accountant(3).to_json()))
    state = RecordDict()
    # Act
    SiloStore(tmp_path, partition_id=0).restore(state)
    # Assert: the accountant counts the two rounds the ledger records, not three
    restored = dict(state.config_records[records.STATE_PRIVACY])
    assert restored["rounds"] == [1, 2]
    assert restored["use-steps"] == [10, 10]


def test_restore_keeps_an_accountant_that_matches_its_ledger(tmp_path):
    # Arrange
    SiloStore(tmp_path, partition_id=0).save_state(_state_with_ledger(2))
    state = RecordDict()
    # Act
    SiloStore(tmp_path, partition_id=0).restore(state)
    # Assert
    assert dict(state.config_records[records.STATE_PRIVACY]) == dict(ConfigRecord(_accountant(2).to_json()))


def test_restore_refuses_an_accountant_that_contradicts_its_ledger(tmp_path):
    # Arrange: the ledger records σ = 1.5; the accountant on disk says σ = 3.0
    SiloStore(tmp_path, partition_id=0).save_state(_state_with_ledger(2))
    (tmp_path / ACCOUNTANT).write_text(json.dumps(_accountant(2, sigma=3.0).to_json()))
    # Act / Assert
    with pytest.raises(StateError, match=r"counts 2 mechanism use\(s\) but .*ledger.jsonl records 2"):
        SiloStore(tmp_path, partition_id=0).restore(RecordDict())
