"""Item content: one text per catalogue item, from an items file or MovieLens' own item files.

Items are the public catalogue (titles, genres, descriptions a platform shows to
everyone), not user data: their text may be shared with every silo and the server
(see docs/privacy.md, "Item content").

Sources, in order:

* ``items.path``: a CSV/TSV or Parquet file with an id column (``items.id-col``)
  and the text columns (``items.text-cols``) joined into one text per item;
* otherwise, for ``data.dataset = "ml-100k"`` the ``u.item`` file (latin-1, title
  and 19 genre flags) and for ``"ml-1m"`` the ``movies.dat`` file (title and
  ``|``-separated genres) beside the ratings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from common.data.movielens import GENRES
from common.data.text_table import data_line, integer_column, read_text_table, resolve_file
from common.errors import ConfigError, DataError

#: Text of an item the items source does not list (its text embedding is then the
#: encoder's embedding of the empty string).
MISSING_TEXT = ""


def read_items_file(path: Path, id_col: str, text_cols: Sequence[str]) -> dict[str, str]:
    """Item id -> text from a CSV/TSV/Parquet items file.

    The text of an item is its non-empty ``text_cols`` values joined by ``". "``,
    each prefixed by the column name (``"title: Heat. genres: Action|Crime"``).

    Raises
    ------
    DataError
        If the file is missing, unreadable, lacks a named column, has an empty or
        duplicate id, or has no rows; the message names the file (and the row).
    """
    if not path.is_file():
        raise DataError(f"items.path: {path}: not found (an items file: CSV, TSV or Parquet)")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        elif suffix in (".csv", ".tsv", ".txt"):
            frame = pd.read_csv(
                path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False
            )
        else:
            raise DataError(
                f"items.path: {path}: unknown suffix {path.suffix!r}; use .csv, .tsv or .parquet"
            )
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"items.path: {path}: cannot be read: {exc}") from exc
    columns = [str(c) for c in frame.columns]
    for key, col in (("items.id-col", id_col), *(("items.text-cols", c) for c in text_cols)):
        if col not in columns:
            raise DataError(f"{key}: {path} has no column {col!r}; its columns are {columns}")
    if frame.empty:
        raise DataError(f"items.path: {path}: no rows")
    first = 2 if suffix != ".parquet" else 1  # line 1 of a text file is its header
    unit = "line" if suffix != ".parquet" else "row"
    ids = frame[id_col].astype(str).str.strip()
    empty = np.flatnonzero((ids == "").to_numpy())
    if len(empty):
        raise DataError(f"{path}: {unit} {empty[0] + first}: empty {id_col!r}")
    dup = ids.duplicated().to_numpy()
    if dup.any():
        i = int(np.argmax(dup))
        raise DataError(f"{path}: {unit} {i + first}: item {ids.iloc[i]!r} is listed twice")
    texts: list[str] = []
    for _, row in frame[list(text_cols)].iterrows():
        parts = [f"{c}: {str(v).strip()}" for c, v in row.items() if _present(v)]
        texts.append(". ".join(parts))
    return dict(zip(ids.tolist(), texts, strict=True))


def _present(value: object) -> bool:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return False
    return bool(str(value).strip())


@dataclass(frozen=True, slots=True)
class MovieLensCatalogue:
    """The public item file of a MovieLens data set: ids, titles, genres, release years (NaN: none)."""

    item_ids: NDArray[np.int64]
    titles: list[str]
    genres: list[list[str]]
    years: NDArray[np.float64]


_YEAR = re.compile(r"(\d{4})")
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _year(date: object, title: str) -> float:
    """The release year: the 4-digit year of ``date`` (``"01-Jan-1995"``), else the title's ``(1995)``, else NaN."""
    found = _YEAR.search(str(date)) if _present(date) else None
    found = found or _TITLE_YEAR.search(title.strip())
    return float(found.group(1)) if found else math.nan


def read_movielens_catalogue(dataset: str, path: Path) -> MovieLensCatalogue:
    """ML-100K ``u.item`` or ML-1M ``movies.dat``, parsed; ``path`` is the data directory or the ratings file in it.

    Raises
    ------
    ConfigError
        If ``dataset`` has no built-in item file.
    DataError
        If the item file is missing or malformed (file and line named).
    """
    base = path if path.is_dir() else path.parent
    if dataset == "ml-100k":
        file = resolve_file(base, "u.item")
        names = ["item_id", "title", "release_date", "video_release_date", "url", *GENRES]
        table = read_text_table(file, names, sep="|", encoding="latin-1")
        items = integer_column(file, table, "item_id", data_line)
        flags = np.column_stack([table.column(g).to_numpy(zero_copy_only=False) for g in GENRES])
        bad = (flags != "0") & (flags != "1")
        if bad.any():
            row, genre = np.argwhere(bad)[0]
            raise DataError(
                f"{file}: line {row + 1}: genre flag {GENRES[genre]!r} is {flags[row, genre]!r}, expected 0 or 1"
            )
        genres = [[GENRES[j] for j in np.flatnonzero(r == "1")] for r in flags]
        titles = table.column("title").to_pylist()
        dates = table.column("release_date").to_pylist()
    elif dataset == "ml-1m":
        file = resolve_file(base, "movies.dat")
        table = read_text_table(file, ["item_id", "title", "genres"], sep="::", encoding="latin-1")
        items = integer_column(file, table, "item_id", data_line)
        genres = [g.split("|") if g else [] for g in table.column("genres").to_pylist()]
        titles = table.column("title").to_pylist()
        dates = [None] * len(titles)
    else:
        raise ConfigError(
            f"items.path: data.dataset {dataset!r} has no built-in item file; name an items file "
            "(items.path, items.id-col, items.text-cols)"
        )
    titles = [str(t) if _present(t) else "" for t in titles]
    years = np.array([_year(d, t) for d, t in zip(dates, titles, strict=True)], dtype=np.float64)
    return MovieLensCatalogue(items.astype(np.int64), titles, genres, years)


def read_movielens_items(dataset: str, path: Path) -> dict[str, str]:
    """Item id -> ``"<title>. Genres: <g1>, <g2>"`` from ML-100K ``u.item`` or ML-1M ``movies.dat``.

    ``path`` is the data directory (or the ratings file in it).

    Raises
    ------
    DataError
        If the item file is missing or malformed (file and line named).
    """
    cat = read_movielens_catalogue(dataset, path)
    texts = [
        f"{t.strip()}. Genres: {', '.join(g)}" if g else t.strip() for t, g in zip(cat.titles, cat.genres, strict=True)
    ]
    return dict(zip(cat.item_ids.astype(str).tolist(), texts, strict=True))


def catalogue_texts(item_ids: Sequence[str] | np.ndarray, texts: Mapping[str, str]) -> tuple[list[str], int]:
    """Texts aligned with the catalogue's item index, and how many items had none.

    ``item_ids[i]`` is the external id of item index ``i``; an item the source does
    not list gets :data:`MISSING_TEXT`.
    """
    out = [texts.get(str(i), MISSING_TEXT) for i in item_ids]
    missing = sum(str(i) not in texts for i in item_ids)
    return out, missing
