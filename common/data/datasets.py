"""Interaction logs by data-set name: synthetic, MovieLens, or a CSV/Parquet file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.data.loaders import load_interactions_file
from common.data.movielens import load_movielens_1m, load_movielens_100k
from common.data.schema import Interactions
from common.data.synthetic import SyntheticSpec, generate_synthetic
from common.errors import ConfigError

DATASETS: tuple[str, ...] = ("synthetic", "ml-100k", "ml-1m", "csv", "parquet")


def load_dataset(name: str, data_dir: Path | None, **kw: Any) -> Interactions:
    """Load a data set by name.

    Parameters
    ----------
    name : str
        One of `DATASETS`: ``"synthetic"`` (``kw`` are `SyntheticSpec` fields and
        `data_dir` is unused), ``"ml-100k"`` or ``"ml-1m"`` (`data_dir` is the data
        set's directory or ratings file), ``"csv"`` or ``"parquet"`` (`data_dir` is
        the file, read as delimited text or as Parquet whatever its suffix).
    data_dir : Path or None
        Where the data lives; required for every name but ``"synthetic"``.
    **kw : Any
        For ``"synthetic"``, `SyntheticSpec` fields; for ``"csv"``/``"parquet"``,
        keyword arguments of `load_interactions_file`. MovieLens ignores them: its
        columns are fixed.

    Returns
    -------
    Interactions
        The loaded log.

    Raises
    ------
    ConfigError
        If `name` is unknown or `data_dir` is missing.
    DataError
        If the data is missing or malformed.
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}; expected one of {DATASETS}")
    if name == "synthetic":
        return generate_synthetic(SyntheticSpec(**kw))
    if data_dir is None:
        raise ConfigError(f"data set {name!r} needs a data path; none was given")
    if name == "ml-100k":
        return load_movielens_100k(data_dir)
    if name == "ml-1m":
        return load_movielens_1m(data_dir)
    return load_interactions_file(data_dir, file_format=name, **kw)
