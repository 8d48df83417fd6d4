"""Deterministic seeds derived from (run seed, node, round, purpose)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported by the one function that needs it: the data path runs without it
    import torch


def derive_seed(run_seed: int, *keys: int | str) -> int:
    """Derive an independent 63-bit seed from the run seed and any number of keys.

    The same (run_seed, keys) always gives the same seed; different keys give
    statistically independent streams (BLAKE2b of the tuple).
    """
    text = "/".join(str(k) for k in (run_seed, *keys))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def numpy_rng(run_seed: int, *keys: int | str) -> np.random.Generator:
    """A numpy Generator seeded by :func:`derive_seed`."""
    return np.random.default_rng(derive_seed(run_seed, *keys))


def torch_generator(run_seed: int, *keys: int | str) -> torch.Generator:
    """A CPU torch Generator seeded by :func:`derive_seed`."""
    import torch

    gen = torch.Generator()
    gen.manual_seed(derive_seed(run_seed, *keys))
    return gen
