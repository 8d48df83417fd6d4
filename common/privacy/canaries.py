"""Canaries for the empirical audit of local DP-SGD (one training run).

``m`` canary items are appended to the shared catalogue (indices
``num_items .. num_items+m-1``). In the audited silo, canary ``i`` is a user whose
only training interaction is canary item ``i``, included independently with
probability ½. Canary items are never drawn as training negatives (negatives come
from the real catalogue only), so nothing but canary ``i`` touches item ``i``'s row
on purpose: in a run without noise, an excluded canary's item row stays exactly at
its initial value and an included one moves.

After training, each canary is scored by how far its item rows moved from their
initial values; :mod:`common.privacy.empirical` turns the guesses into a lower
bound on ε (Steinke, Nasr and Jagielski, 2023). A canary user is one user with one
interaction, so the bound audits the user- and the interaction-level claim alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from common.config import AuditSettings
from common.data.split import NO_ITEM, UserSplit
from common.seeding import derive_seed


@dataclass(frozen=True, slots=True)
class CanaryPlan:
    """Which canary items exist and which canaries the audited silo trains on."""

    first_item: int
    included: NDArray[np.bool_]

    @property
    def count(self) -> int:
        """Number of canaries m."""
        return len(self.included)

    @property
    def items(self) -> NDArray[np.int64]:
        """Item indices of the canaries."""
        return np.arange(self.first_item, self.first_item + self.count, dtype=np.int64)


def canary_plan(audit: AuditSettings, num_real_items: int) -> CanaryPlan:
    """Draw the inclusion of each canary (probability ½, from ``audit.seed``)."""
    rng = np.random.default_rng(derive_seed(audit.seed, "canaries"))
    return CanaryPlan(num_real_items, rng.random(audit.canaries) < 0.5)


def with_canary_items(split: UserSplit, count: int) -> UserSplit:
    """The same users, in a catalogue extended by ``count`` canary items."""
    return replace(split, num_items=split.num_items + count)


def with_canary_users(split: UserSplit, plan: CanaryPlan) -> UserSplit:
    """``split`` (catalogue already extended) plus one user per included canary.

    Canary users have no held-out items (``NO_ITEM``), so evaluation skips them.
    """
    items = plan.items[plan.included]
    n = len(items)
    users = np.arange(split.num_users, split.num_users + n, dtype=np.int64)
    none = np.full(n, NO_ITEM, dtype=np.int64)
    negatives = np.full((n, split.val_negatives.shape[1]), NO_ITEM, dtype=np.int64)
    return UserSplit(
        num_items=split.num_items,
        train_user=np.concatenate([split.train_user, users]),
        train_item=np.concatenate([split.train_item, items]),
        val_item=np.concatenate([split.val_item, none]),
        test_item=np.concatenate([split.test_item, none]),
        val_negatives=np.concatenate([split.val_negatives, negatives]),
        test_negatives=np.concatenate([split.test_negatives, negatives]),
        user_global_idx=np.concatenate([split.user_global_idx, np.full(n, -1, dtype=np.int64)]),
    )


def canary_scores(
    initial: Mapping[str, NDArray[np.floating]],
    final: Mapping[str, NDArray[np.floating]],
    item_tables: tuple[str, ...],
    plan: CanaryPlan,
) -> NDArray[np.float64]:
    """Squared distance each canary's item rows moved over training (higher = "in")."""
    score = np.zeros(plan.count)
    for name in item_tables:
        key = f"{name}.weight"
        moved = final[key][plan.items].astype(np.float64) - initial[key][plan.items]
        score += (moved.reshape(plan.count, -1) ** 2).sum(1)
    return score
