"""A silo's node state: its data and its users' private parameters.

Flower ClientApps are stateless between messages; what a silo must remember lives
in ``context.state`` (a RecordDict kept by the node). Nothing here is ever sent.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from common import records
from common.data.silo import SiloData
from common.data.split import UserSplit
from common.models import Recommender, load_partial_state, private_state

_SPLIT_FIELDS = (
    "train_user",
    "train_item",
    "val_item",
    "test_item",
    "val_negatives",
    "test_negatives",
    "user_global_idx",
)


def save_silo_data(state: RecordDict, data: SiloData) -> None:
    """Keep the silo's split in node state so later rounds skip loading files."""
    arrays = {name: Array(getattr(data.split, name)) for name in _SPLIT_FIELDS}
    arrays["item_popularity"] = Array(data.item_popularity)
    arrays["num_items"] = Array(np.array([data.split.num_items]))
    state[records.STATE_SILO_DATA] = ArrayRecord(arrays)


def load_silo_data(state: RecordDict) -> SiloData | None:
    """The split kept by :func:`save_silo_data`, or None on a fresh node."""
    if records.STATE_SILO_DATA not in state:
        return None
    rec = state.array_records[records.STATE_SILO_DATA]
    split = UserSplit(
        num_items=int(rec["num_items"].numpy()[0]),
        **{name: rec[name].numpy() for name in _SPLIT_FIELDS},
    )
    return SiloData(split, rec["item_popularity"].numpy())


def save_user_params(state: RecordDict, model: Recommender) -> None:
    """Store the users' private parameters (embeddings, biases) in node state."""
    state[records.STATE_USER_PARAMS] = ArrayRecord(torch_state_dict=private_state(model))


def restore_user_params(state: RecordDict, model: Recommender) -> bool:
    """Load the stored private parameters into ``model``; False if none are stored."""
    if records.STATE_USER_PARAMS not in state:
        return False
    stored = state.array_records[records.STATE_USER_PARAMS].to_torch_state_dict()
    load_partial_state(model, dict(stored), private=True)
    return True
