"""Named arrays <-> one flat float64 vector, in sorted-name order (both sides agree on it)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Concatenate ``arrays`` (sorted by name), each raveled, as float64."""
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in sorted(arrays)])


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Split ``vector`` back into arrays of ``shapes`` (sorted by name)."""
    sizes = {k: int(np.prod(shapes[k], dtype=np.int64)) for k in sorted(shapes)}
    if sum(sizes.values()) != vector.size:
        raise ValueError(f"unflatten: vector has {vector.size} values, the shapes need {sum(sizes.values())}")
    out, start = {}, 0
    for k, size in sizes.items():
        out[k] = vector[start : start + size].reshape(shapes[k])
        start += size
    return out
