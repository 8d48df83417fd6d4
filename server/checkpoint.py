"""Server checkpoints: the atomic writers and .npz format of :mod:`common.storage`."""

from common.storage import (
    atomic_write_bytes,
    atomic_write_json,
    load_arrays,
    save_arrays,
)

__all__ = ["atomic_write_bytes", "atomic_write_json", "load_arrays", "save_arrays"]
