"""In-memory interaction log with contiguous user and item indices."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from common.errors import DataError


@dataclass(frozen=True, slots=True)
class Interactions:
    """An implicit-feedback interaction log.

    Every row is one positive interaction. ``user_idx``/``item_idx`` are contiguous
    indices into ``user_ids``/``item_ids`` (the external IDs, kept as strings).
    Row order is the order of the source file; it is the tie-break for equal
    timestamps in the leave-one-out split.

    Parameters
    ----------
    user_idx, item_idx : (N,) int64 arrays
        Contiguous indices, ``0 <= user_idx < len(user_ids)``.
    timestamp : (N,) int64 array
        Interaction time (any monotone unit).
    user_ids, item_ids : (U,), (I,) object arrays of str
        External identifiers.
    item_category : (I,) int64 array or None
        Optional category of each item (genre, synthetic cluster); used by skewed
        partitioners. ``-1`` means unknown.
    source : str
        Human-readable origin (file path or generator spec) used in messages.
    """

    user_idx: NDArray[np.int64]
    item_idx: NDArray[np.int64]
    timestamp: NDArray[np.int64]
    user_ids: NDArray[np.object_]
    item_ids: NDArray[np.object_]
    item_category: NDArray[np.int64] | None = None
    source: str = field(default="<memory>")

    def __post_init__(self) -> None:
        n = len(self.user_idx)
        if len(self.item_idx) != n or len(self.timestamp) != n:
            raise DataError(
                f"{self.source}: user_idx, item_idx and timestamp must have equal "
                f"length, got {n}, {len(self.item_idx)}, {len(self.timestamp)}"
            )
        if n == 0:
            raise DataError(f"{self.source}: no interactions")
        if self.user_idx.min() < 0 or self.user_idx.max() >= len(self.user_ids):
            raise DataError(f"{self.source}: user_idx out of range of user_ids")
        if self.item_idx.min() < 0 or self.item_idx.max() >= len(self.item_ids):
            raise DataError(f"{self.source}: item_idx out of range of item_ids")
        if self.item_category is not None and len(self.item_category) != len(
            self.item_ids
        ):
            raise DataError(f"{self.source}: item_category must have one entry per item")

    @property
    def num_users(self) -> int:
        """Number of distinct users."""
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        """Size of the shared item catalogue."""
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.user_idx)

    @classmethod
    def from_external_ids(
        cls,
        users: NDArray[np.object_] | list[str],
        items: NDArray[np.object_] | list[str],
        timestamp: NDArray[np.int64],
        *,
        source: str,
        item_category: dict[str, int] | None = None,
    ) -> Interactions:
        """Build a log from external IDs, assigning indices in order of first appearance.

        Duplicate (user, item) pairs are kept: re-consumption is a repeated positive.
        """
        users_arr = np.asarray(users, dtype=object).astype(str)
        items_arr = np.asarray(items, dtype=object).astype(str)
        user_ids, user_idx = _index(users_arr)
        item_ids, item_idx = _index(items_arr)
        category = None
        if item_category is not None:
            category = np.array(
                [item_category.get(i, -1) for i in item_ids], dtype=np.int64
            )
        return cls(
            user_idx=user_idx,
            item_idx=item_idx,
            timestamp=np.asarray(timestamp, dtype=np.int64),
            user_ids=user_ids,
            item_ids=item_ids,
            item_category=category,
            source=source,
        )


def _index(values: NDArray[np.str_]) -> tuple[NDArray[np.object_], NDArray[np.int64]]:
    """Map values to contiguous indices in order of first appearance."""
    uniq, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # first-appearance order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return uniq[order].astype(object), rank[inverse].astype(np.int64)
