"""One silo's served model: shared arrays, its users' rows, id maps, seen items; top-K and scores."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.errors import FedrecError
from common.recency import ITEM_ROWS, RECENT_ITEMS_KEY, RECENT_WEIGHT_KEY, USER_ROWS, history_profile
from serving import scoring


class ServingError(FedrecError):
    """A served model or request that cannot be answered (names what and where)."""


@dataclass(frozen=True)
class ServedSilo:
    """What serving one silo needs; nothing here leaves the silo unless exported.

    ``users`` are the silo's private rows (row ``r`` belongs to raw user
    ``user_ids[r]``); item row ``i`` is raw item ``item_ids[i]``; the items user row ``r``
    interacted with (training and held-out) are ``seen_items[seen_indptr[r]:seen_indptr[r + 1]]``.
    """

    kind: str
    shared: dict[str, NDArray[np.float32]]
    users: dict[str, NDArray[np.float32]]
    user_ids: NDArray[np.object_]
    item_ids: NDArray[np.object_]
    seen_indptr: NDArray[np.int64]
    seen_items: NDArray[np.int64]
    silo: int
    num_silos: int
    source: str
    titles: list[str] | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # loss, l2, num-negatives (fold-in)
    personalized: bool = False  # shared arrays and rows are the silo's personalized copy

    def __post_init__(self) -> None:
        n = scoring.check_rows(self.kind, self.shared, self.users, self.source)
        if n != len(self.user_ids):
            raise ServingError(f"{self.source}: {n} user rows but {len(self.user_ids)} user ids")
        num_items = scoring.dims(self.kind, self.shared)["num-items"]
        if num_items != len(self.item_ids):
            raise ServingError(
                f"{self.source}: the shared model has {num_items} items but the data's catalogue has "
                f"{len(self.item_ids)}: the model and data do not belong together"
            )

    def seen(self, row: int) -> NDArray[np.int64]:
        return self.seen_items[self.seen_indptr[row] : self.seen_indptr[row + 1]]

    def fingerprint(self) -> str:
        """SHA-256 of the catalogue's item ids, the silo's user ids and its training pairs."""
        h = hashlib.sha256()
        for ids in (self.item_ids, self.user_ids):
            h.update("\n".join(map(str, ids)).encode())
            h.update(b"\0")
        h.update(np.ascontiguousarray(self.seen_indptr, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.seen_items, dtype="<i8").tobytes())
        return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Recommendation:
    """Top-K of one user: raw item ids, scores, titles when known."""

    user: str
    items: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"user": self.user, "items": self.items}


class Recommender:
    """Top-K and scores of one silo's users (``fedrec.load`` returns one)."""

    def __init__(self, served: ServedSilo) -> None:
        self.served = served
        self._user_row = {str(u): r for r, u in enumerate(served.user_ids)}
        self._item_row = {str(i): r for r, i in enumerate(served.item_ids)}

    @property
    def silo(self) -> int:
        return self.served.silo

    @property
    def user_ids(self) -> list[str]:
        return [str(u) for u in self.served.user_ids]

    def row_of(self, user_id: object) -> int:
        """The row of raw user ``user_id``; unknown users are a :class:`ServingError`."""
        row = self._user_row.get(str(user_id))
        if row is None:
            raise ServingError(
                f"user {str(user_id)!r} is not a user of silo {self.silo} in {self.served.source} "
                f"({len(self._user_row)} users there); for a new user pass their history (--history)"
            )
        return row

    def item_rows(self, item_ids: Sequence[object]) -> NDArray[np.int64]:
        """Catalogue rows of raw item ids; an unknown id is a :class:`ServingError`."""
        rows = []
        for item in item_ids:
            row = self._item_row.get(str(item))
            if row is None:
                raise ServingError(
                    f"item {str(item)!r} is not in the catalogue of {self.served.source} ({len(self._item_row)} items)"
                )
            rows.append(row)
        return np.asarray(rows, dtype=np.int64)

    def score(
        self, user_ids: Sequence[object], item_ids: Sequence[object]
    ) -> NDArray[np.float32]:
        """Scores (len(user_ids), len(item_ids)) of known users for raw item ids."""
        rows = np.asarray([self.row_of(u) for u in user_ids], dtype=np.int64)
        items = self.item_rows(item_ids)
        return scoring.score(self.served.kind, self.served.shared, self.served.users, rows)[:, items]

    def recommend(
        self, user_ids: Sequence[object] | str, k: int = 10, *, include_seen: bool = False
    ) -> list[Recommendation]:
        """Top-``k`` items of each user; every item they interacted with is left out unless ``include_seen``."""
        if isinstance(user_ids, str):
            user_ids = [user_ids]
        _check_k(k)
        out = []
        for user in user_ids:
            row = self.row_of(user)
            scores = scoring.score(self.served.kind, self.served.shared, self.served.users, np.array([row]))[0]
            exclude = np.empty(0, np.int64) if include_seen else self.served.seen(row)
            out.append(self._ranked(str(user), scores, exclude, k))
        return out

    def recommend_new_user(
        self, history: Sequence[object], k: int = 10, *, include_seen: bool = False, user: str = "new"
    ) -> Recommendation:
        """Top-``k`` for a user the model never saw: fold their row in from ``history`` (raw item ids).

        ``history`` is in time order (oldest first); a silo serving its recency copy
        (``personalize.method = "recency"``) shifts the new row toward the last items of
        it, with the silo's (m, β), as it shifted its own users' rows.
        """
        from serving.foldin import fold_in

        _check_k(k)
        items = self.item_rows(list(history))
        if len(items) == 0:
            raise ServingError("--history: give at least one item id the new user interacted with")
        rows = fold_in(self.served.kind, self.served.shared, [items], self.served.train)
        m, weight = self.served.train.get(RECENT_ITEMS_KEY), self.served.train.get(RECENT_WEIGHT_KEY)
        if m and weight:  # the silo's recency copy: shift the new row like its users' (history in time order)
            profile = history_profile(items, self.served.shared[ITEM_ROWS], int(m))
            rows = {**rows, USER_ROWS: rows[USER_ROWS] + np.float32(weight) * profile.astype(np.float32)}
        scores = scoring.score(self.served.kind, self.served.shared, rows, np.array([0]))[0]
        return self._ranked(user, scores, np.empty(0, np.int64) if include_seen else np.unique(items), k)

    def _ranked(self, user: str, scores: NDArray[np.float32], exclude: NDArray[np.int64], k: int) -> Recommendation:
        items = []
        for i in scoring.top_k(scores, k, exclude):
            entry: dict[str, Any] = {"item": str(self.served.item_ids[i]), "score": float(scores[i])}
            if self.served.titles is not None and self.served.titles[i]:
                entry["title"] = self.served.titles[i]
            items.append(entry)
        return Recommendation(user, items)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ServingError(f"k must be an integer >= 1, got {k!r}")


def csr(
    users: NDArray[np.int64], items: NDArray[np.int64], num_users: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Items per user row as (indptr, items sorted by user then item)."""
    order = np.lexsort((items, users))
    counts = np.bincount(users, minlength=num_users)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return indptr, np.asarray(items[order], dtype=np.int64)
