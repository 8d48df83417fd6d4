"""One silo's data, and the global leave-one-out split every silo's data comes from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.data.schema import Interactions
from common.data.split import UserSplit, leave_one_out
from common.seeding import derive_seed


@dataclass(frozen=True, slots=True)
class SiloData:
    """Everything one silo trains and evaluates on.

    ``item_popularity`` (training interactions per item divided by the number of
    users, over all silos) is a public catalogue statistic used only for the
    popularity-bias metric.
    """

    split: UserSplit
    item_popularity: NDArray[np.float64]


def pooled_split(
    interactions: Interactions, *, eval_negatives: int, seed: int
) -> SiloData:
    """Split all users leave-one-out (run seed ``seed``); add item popularity.

    The one place the global split is made: simulation and ``fedrec data prepare``
    both call it, so the same seed gives the same held-out items and negatives.
    """
    split = leave_one_out(
        interactions, num_negatives=eval_negatives, seed=derive_seed(seed, "split")
    )
    counts = np.bincount(split.train_item, minlength=split.num_items)
    return SiloData(split, counts / split.num_users)
