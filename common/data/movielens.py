"""MovieLens raw files (ML-100K ``u.data``/``u.item``, ML-1M ``ratings.dat``/``movies.dat``) as implicit feedback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from common.data.schema import Interactions
from common.data.text_table import NUMBER, data_line, integer_column, read_text_table, require_pattern, resolve_file
from common.errors import DataError

#: MovieLens genres in the order of ML-100K's ``u.genre``; a category is an index here.
GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_ML_RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


def load_movielens_100k(path: Path) -> Interactions:
    """Load MovieLens-100K ``u.data`` as implicit feedback.

    Every rating is a positive; rating values are validated as numbers, then ignored.
    If ``u.item`` lies beside ``u.data``, each item's category is the index in
    `GENRES` of its first set genre flag (``-1`` if none is set).

    Parameters
    ----------
    path : Path
        The ``ml-100k`` directory or the ``u.data`` file itself.

    Returns
    -------
    Interactions
        One row per line of ``u.data``, in file order.

    Raises
    ------
    DataError
        If a file is missing, empty or malformed; the message names the file and the
        1-based line number.
    """
    data_file = resolve_file(Path(path), "u.data")
    table = read_text_table(data_file, _ML_RATING_COLUMNS, sep="\t")
    item_file = data_file.with_name("u.item")
    categories = _ml100k_categories(item_file) if item_file.is_file() else None
    return _movielens(data_file, table, categories)


def load_movielens_1m(path: Path) -> Interactions:
    """Load MovieLens-1M ``ratings.dat`` as implicit feedback.

    Every rating is a positive; rating values are validated as numbers, then ignored.
    If ``movies.dat`` lies beside ``ratings.dat``, each item's category is the index
    in `GENRES` of its first listed genre.

    Parameters
    ----------
    path : Path
        The ``ml-1m`` directory or the ``ratings.dat`` file itself.

    Returns
    -------
    Interactions
        One row per line of ``ratings.dat``, in file order.

    Raises
    ------
    DataError
        If a file is missing, empty or malformed; the message names the file and the
        1-based line number.
    """
    data_file = resolve_file(Path(path), "ratings.dat")
    table = read_text_table(data_file, _ML_RATING_COLUMNS, sep="::")
    movie_file = data_file.with_name("movies.dat")
    categories = _ml1m_categories(movie_file) if movie_file.is_file() else None
    return _movielens(data_file, table, categories)


def _movielens(
    path: Path, table: pa.Table, categories: dict[str, int] | None
) -> Interactions:
    """Build interactions from the string columns of a MovieLens ratings file."""
    users = integer_column(path, table, "user_id", data_line)
    items = integer_column(path, table, "item_id", data_line)
    require_pattern(path, table, "rating", NUMBER, "is not a number", data_line)
    timestamp = integer_column(path, table, "timestamp", data_line)
    if (timestamp < 0).any():
        i = int(np.argmax(timestamp < 0))
        raise DataError(
            f"{path}: {data_line(i)}: timestamp {int(timestamp[i])} is negative; "
            "times must be >= 0 seconds since 1970-01-01 UTC"
        )
    return Interactions.from_external_ids(
        users.astype(str),
        items.astype(str),
        timestamp,
        source=str(path),
        item_category=categories,
        row_unit="line",
    )


def _ml100k_categories(path: Path) -> dict[str, int]:
    """Map each item of ``u.item`` to the index of its first set genre flag, or -1."""
    names = ["item_id", "title", "release_date", "video_release_date", "url", *GENRES]
    table = read_text_table(path, names, sep="|", encoding="latin-1")
    items = integer_column(path, table, "item_id", data_line)
    flags = np.column_stack(
        [table.column(g).to_numpy(zero_copy_only=False) for g in GENRES]
    )  # (I, 19) str
    invalid = (flags != "0") & (flags != "1")
    if invalid.any():
        row, genre = np.argwhere(invalid)[0]
        raise DataError(
            f"{path}: line {row + 1}: genre flag {GENRES[genre]!r} is "
            f"{flags[row, genre]!r}, expected 0 or 1"
        )
    is_set = flags == "1"
    category = np.where(is_set.any(axis=1), is_set.argmax(axis=1), -1)
    return dict(zip(items.astype(str).tolist(), category.tolist(), strict=True))


def _ml1m_categories(path: Path) -> dict[str, int]:
    """Map each item of ``movies.dat`` to the index of its first genre."""
    names = ["item_id", "title", "genres"]
    table = read_text_table(path, names, sep="::", encoding="latin-1")
    items = integer_column(path, table, "item_id", data_line)
    first = [g.split("|", 1)[0] for g in table.column("genres").to_pylist()]
    index = {genre: i for i, genre in enumerate(GENRES)}
    unknown = [i for i, g in enumerate(first) if g not in index]
    if unknown:
        raise DataError(
            f"{path}: line {unknown[0] + 1}: unknown genre {first[unknown[0]]!r}; "
            f"expected one of {GENRES}"
        )
    return {str(i): index[g] for i, g in zip(items.tolist(), first, strict=True)}
