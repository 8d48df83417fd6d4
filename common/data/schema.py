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
    timestamps in the leave-one-out split. Duplicate (user, item) rows are kept
    here; the split keeps the earliest of each pair (`common.data.split`).

    Parameters
    ----------
    user_idx, item_idx : (N,) int64 arrays
        Contiguous indices, ``0 <= user_idx < len(user_ids)``.
    timestamp : (N,) int64 array
        Interaction time (any monotone unit, >= 0); all 0 when ``time_column`` is
        ``""``.
    user_ids, item_ids : (U,), (I,) object arrays of str
        External identifiers.
    item_category : (I,) int64 array or None
        Optional category of each item (genre, synthetic cluster); used by skewed
        partitioners. ``-1`` means unknown.
    source : str
        Human-readable origin (file path or generator spec) used in messages.
    time_column : str
        Name of the source's timestamp column, for messages; ``""`` means the log
        has no time, and the leave-one-out split is then a seeded random one.
    row_unit, first_row : str, int
        Row ``i`` is ``f"{row_unit} {i + first_row}"`` of the source (``line 2``
        for the first data line of a text file with a header), for messages.
    """

    user_idx: NDArray[np.int64]
    item_idx: NDArray[np.int64]
    timestamp: NDArray[np.int64]
    user_ids: NDArray[np.object_]
    item_ids: NDArray[np.object_]
    item_category: NDArray[np.int64] | None = None
    source: str = field(default="<memory>")
    time_column: str = "timestamp"
    row_unit: str = "row"
    first_row: int = 1

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
        if self.timestamp.min() < 0:
            i = int(self.timestamp.argmin())
            raise DataError(
                f"{self.source}: {self.locate(i)}: {self.time_column or 'timestamp'} "
                f"{int(self.timestamp[i])} is negative; times must be >= 0"
            )

    @property
    def has_time(self) -> bool:
        """Whether rows carry a time (else the split orders each user at random)."""
        return bool(self.time_column)

    def locate(self, i: int) -> str:
        """Where row ``i`` is in the source, e.g. ``"line 7"``, for messages."""
        return f"{self.row_unit} {i + self.first_row}"

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
        time_column: str = "timestamp",
        row_unit: str = "row",
        first_row: int = 1,
    ) -> Interactions:
        """Build a log from external IDs, assigning indices in order of first appearance.

        Duplicate (user, item) pairs are kept here (the split drops all but the
        earliest of each pair, with a `DataWarning`).
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
            time_column=time_column,
            row_unit=row_unit,
            first_row=first_row,
        )


def _index(values: NDArray[np.str_]) -> tuple[NDArray[np.object_], NDArray[np.int64]]:
    """Map values to contiguous indices in order of first appearance."""
    uniq, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # first-appearance order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return uniq[order].astype(object), rank[inverse].astype(np.int64)
