"""A user's recency profile: the mean unit item row of its latest items (numpy only, for training and serving).

``personalize.method = "recency"`` (:func:`common.personalization.recency_select`) shifts
each user's row ``p_u`` to ``p_u + β · r_u``, ``r_u`` the profile of the user's last ``m``
training items; serving shifts a user folded in later from its history the same way
(:meth:`serving.silo.Recommender.recommend_new_user`), with the silo's (m, β) kept
beside the copy's arrays under :data:`RECENT_ITEMS_KEY` and :data:`RECENT_WEIGHT_KEY`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

#: The users' row table a recency shift moves (MF's).
USER_ROWS = "user_embedding.weight"
#: The item row table a recency profile is made of (MF's).
ITEM_ROWS = "item_embedding.weight"
#: Keys of a recency copy's (m, β) beside its arrays (``personalized.npz``, a bundle's ``train``):
#: what shifts a user folded in later the same way (:func:`history_profile`).
RECENT_ITEMS_KEY, RECENT_WEIGHT_KEY = "personalize.recent-items", "personalize.recent-weight"
RECENCY_KEYS = (RECENT_ITEMS_KEY, RECENT_WEIGHT_KEY)


def unit_rows(item_rows: NDArray[np.floating]) -> NDArray[np.float64]:
    """``item_rows`` scaled to unit L2 norm (rows of norm 0 stay 0)."""
    rows = np.asarray(item_rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def history_profile(history: NDArray[np.int64], item_rows: NDArray[np.floating], items: int) -> NDArray[np.float64]:
    """One user's recency profile from its item rows ``history`` in time order (oldest first): the last ``items``."""
    if items < 1:
        raise ValueError(f"history_profile: items must be >= 1, got {items}")
    recent = np.asarray(history, dtype=np.int64)[-items:]
    return unit_rows(np.asarray(item_rows)[recent]).mean(axis=0) if len(recent) else np.zeros(np.shape(item_rows)[1])
