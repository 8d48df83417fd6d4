"""Loading interaction logs from CSV/TSV/Parquet files: format, column mapping, timestamps, categories."""

from __future__ import annotations

import csv
import functools
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpy.typing import NDArray

from common.data.schema import Interactions
from common.data.text_table import INTEGER, NUMBER, SEP_NAMES, Locator, read_text_table
from common.errors import ConfigError, DataError

#: The setting that names each column, for messages.
_KEYS = {
    "user": "data.user-col",
    "item": "data.item-col",
    "timestamp": "data.timestamp-col",
    "category": "category_col",
}
_INT64_LIMIT = 2.0**63  # first float that does not fit in int64
_CONTROL = r"[\x00-\x08\x0b-\x1f\x7f]"  # ASCII control characters but tab and line feed
_TEXT_SEPS = {".csv": ",", ".tsv": "\t"}
_PARQUET_SUFFIXES = (".parquet", ".pq")
_EPOCH = pd.Timestamp(0, tz="UTC")


def load_interactions_file(
    path: Path,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    timestamp_col: str = "timestamp",
    category_col: str | None = None,
    sep: str | None = None,
    header: bool = True,
    file_format: str | None = None,
) -> Interactions:
    """Load an interaction log from a delimited text file or from a Parquet file.

    IDs may be any non-empty strings. A timestamp is a number (seconds, floored to
    an integer) or an ISO 8601 datetime (naive ones are read as UTC), stored as
    integer seconds since the Unix epoch; it must lie in ``[0, 2**63)`` seconds.
    Categories, if given, are integers or names; names are numbered in sorted order.
    Text files may have LF or CRLF line endings and must be UTF-8.

    Parameters
    ----------
    path : Path
        The log. Without `file_format`, a ``.csv``, ``.tsv`` or ``.txt`` text file,
        or a ``.parquet`` or ``.pq`` file. A symbolic link is followed, and messages
        name the file it points to.
    user_col, item_col, timestamp_col : str
        The user ID, item ID and timestamp columns: names, or with ``header=False``
        0-based column indices such as ``"0"``. ``timestamp_col=""`` means the log
        has no time: all timestamps are 0 and the split is a seeded random one.
    category_col : str or None
        The item category column; each item must have one category.
    sep : str or None
        Field separator of a text file: one of tab, ``,``, ``;``, ``|``, space or
        ``::``. By default ``,`` for ``.csv``, tab for ``.tsv``, and otherwise the
        most frequent of these in the first line.
    header : bool
        Whether the first line of a text file names the columns.
    file_format : {"csv", "parquet"} or None
        Read the file as delimited text or as Parquet whatever its name; by
        default the suffix decides.

    Returns
    -------
    Interactions
        One row per data row, in file order.

    Raises
    ------
    ConfigError
        If `sep`, `file_format` or (without a header) a column index is invalid.
    DataError
        If the file is missing, empty or malformed, or lacks a column; the message
        names the file, the 1-based line (text) or row (Parquet) number and the
        column.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected an interaction log file")
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected an interaction log)")
    real = Path(os.path.realpath(path)) if path.is_symlink() else path
    columns = {"user": user_col, "item": item_col}
    if timestamp_col:
        columns["timestamp"] = timestamp_col
    if category_col is not None:
        columns["category"] = category_col
    if sep and sep not in SEP_NAMES:
        raise ConfigError(
            f"data.sep: unsupported separator {sep!r}; use one of "
            f"{', '.join(repr(s) for s in SEP_NAMES)}"
        )
    kind = file_format or _format_from_suffix(path, real)
    if kind == "parquet":
        try:
            found = pq.read_schema(real).names
            _check_columns(real, columns, found)
            table = pq.read_table(real, columns=list(dict.fromkeys(columns.values())))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{real}: cannot read as Parquet: {exc}") from exc
        return _from_table(real, table, columns, "row", 1)
    if kind != "csv":
        raise ConfigError(
            f"file_format must be 'csv' or 'parquet' (or None), got {file_format!r}"
        )
    return _load_text(real, path.suffix.lower(), columns, sep or None, header)


def _format_from_suffix(path: Path, real: Path) -> str:
    """Return ``"csv"`` or ``"parquet"`` by the suffix of the name given."""
    suffix = path.suffix.lower()
    if suffix in _PARQUET_SUFFIXES:
        return "parquet"
    if suffix in (*_TEXT_SEPS, ".txt"):
        return "csv"
    raise DataError(
        f"{real}: unsupported file type {suffix!r}; expected .csv, .tsv, .txt, "
        ".parquet or .pq, or name the format (data.dataset = \"csv\" or "
        "\"parquet\") to read it whatever its name"
    )


def _load_text(
    path: Path, suffix: str, columns: dict[str, str], sep: str | None, header: bool
) -> Interactions:
    """Load a delimited text log (see `load_interactions_file`)."""
    with path.open("rb") as file:
        if file.read(4) == b"PAR1":
            raise DataError(f'{path}: this is a Parquet file; set data.dataset = "parquet"')
    first = _first_line(path)
    sep = sep or _TEXT_SEPS.get(suffix) or _guess_sep(path, first)
    fields = _split_line(first, sep)
    if header:
        names = fields
        _check_columns(path, columns, names, first_line=first, sep=sep)
        if len(set(names)) != len(names):
            raise DataError(f"{path}: line 1: duplicate column names in header {names}")
    else:
        names = [f"column {i}" for i in range(len(fields))]
        columns = {
            key: names[_column_index(path, key, column, len(fields))]
            for key, column in columns.items()
        }
    table = read_text_table(path, names, sep=sep, quoted=True)
    rows = table.slice(1) if header else table  # row 0 is the header itself
    if rows.num_rows == 0:
        raise DataError(f"{path}: no data lines after the header line")
    if header:
        repeated = pc.and_(
            pc.equal(rows.column(columns["user"]), columns["user"]),
            pc.equal(rows.column(columns["item"]), columns["item"]),
        )
        if pc.any(repeated).as_py():
            line = pc.index(repeated, True).as_py() + 2
            raise DataError(f"{path}: line {line} repeats the header line; remove it")
    return _from_table(path, rows, columns, "line", 2 if header else 1)


def _column_index(path: Path, key: str, column: str, num_fields: int) -> int:
    """Return the 0-based index a headerless file's column is given by."""
    if not column.isdigit():
        raise ConfigError(
            f"{_KEYS[key]}: with data.header = false columns are 0-based indices "
            f"(e.g. {_KEYS[key]} = \"0\"), got {column!r}"
        )
    if int(column) >= num_fields:
        raise DataError(
            f"{path}: line 1 has {num_fields} fields (columns 0 to {num_fields - 1}), "
            f"so there is no column {column} ({_KEYS[key]})"
        )
    return int(column)


def _split_line(line: str, sep: str) -> list[str]:
    """Split one text line into fields (quotes allowed with one-character separators)."""
    if len(sep) > 1:
        return line.split(sep)
    return next(csv.reader([line], delimiter=sep))


def _first_line(path: Path) -> str:
    """Return the first line of a text file, decoded; raise if it is unusable."""
    with path.open("rb") as file:
        first = file.readline()
    if first.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: the file is UTF-16; re-save it as UTF-8")
    if b"\x00" in first:
        raise DataError(
            f"{path}: line 1 holds NUL bytes: the file is binary or UTF-16 without a "
            "byte order mark; re-save it as UTF-8 text"
        )
    if b"\r" in first.rstrip(b"\r\n"):
        raise DataError(
            f"{path}: line 1 ends with a lone carriage return (classic Mac line "
            "endings); re-save the file with LF or CRLF line endings"
        )
    try:
        line = first.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: line 1 is not UTF-8 ({exc.reason}); re-save the file as UTF-8"
        ) from None
    if not line.strip():
        problem = "line 1 is blank" if path.read_bytes().strip() else "empty file"
        raise DataError(f"{path}: {problem}; expected a header line naming the columns")
    return line


def _guess_sep(path: Path, header: str) -> str:
    """Return the most frequent candidate separator in the first line."""
    sep = max(SEP_NAMES, key=header.count)
    if sep not in header:
        raise DataError(
            f"{path}: cannot tell the field separator from line 1 {header!r}; set "
            "data.sep"
        )
    return sep


def _check_columns(
    path: Path,
    columns: dict[str, str],
    found: list[str],
    *,
    first_line: str | None = None,
    sep: str | None = None,
) -> None:
    """Raise if a requested column is not among the columns found, with hints."""
    missing = [c for c in columns.values() if c not in found]
    if not missing:
        return
    hints = []
    for key, column in columns.items():
        near = [f for f in found if f.strip().lower() == column.strip().lower()]
        if column in missing and near:
            hints.append(
                f"names are case- and space-sensitive: set {_KEYS[key]} = \"{near[0]}\""
            )
    if first_line is not None and len(found) == 1:
        others = [s for s in SEP_NAMES if s != sep and s in first_line]
        if others:
            other = max(others, key=first_line.count)
            label = "TAB" if other == "\t" else SEP_NAMES[other]
            spelled = "\\t" if other == "\t" else other
            hints.append(f'the file looks {label}-separated; set data.sep = "{spelled}"')
    if first_line is not None and all(re.fullmatch(NUMBER, f.strip()) for f in found):
        hints.append(
            "line 1 looks like data, not a header: for a file without one set "
            'data.header = false and give columns as 0-based indices (data.user-col = "0")'
        )
    raise DataError(
        f"{path}: missing column(s) {missing}; the file has columns {found}"
        + "".join(f"; {h}" for h in hints)
    )


def _from_table(
    path: Path, table: pa.Table, columns: dict[str, str], row_unit: str, first_row: int
) -> Interactions:
    """Validate the mapped columns of a text or Parquet table and build interactions."""

    def where(i: int) -> str:
        return f"{row_unit} {i + first_row}"

    keys = ("user", "item", "category") if "category" in columns else ("user", "item")
    ids = {key: _strings(path, table, columns[key], where) for key in keys}
    for key in ("user", "item"):
        _reject_float_spellings(path, ids[key], columns[key], key, where)
    time_column = columns.get("timestamp", "")
    if time_column:
        timestamp = _timestamps(path, table, time_column, where)
    else:
        timestamp = np.zeros(table.num_rows, dtype=np.int64)
    categories = None
    if "category" in columns:
        categories = _item_categories(path, ids["item"], ids["category"], where)
    return Interactions.from_external_ids(
        ids["user"],
        ids["item"],
        timestamp,
        source=str(path),
        item_category=categories,
        time_column=time_column,
        row_unit=row_unit,
        first_row=first_row,
    )


def _timestamps(
    path: Path, table: pa.Table, column: str, where: Locator
) -> NDArray[np.int64]:
    """Parse a timestamp column to int64 seconds, raising at the first bad value."""
    values = table.column(column)
    if values.null_count:
        i = pc.index(pc.is_null(values), True).as_py()
        raise DataError(f"{path}: {where(i)}: {column} is missing")
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        raw = pd.Series(values.to_numpy(zero_copy_only=False), dtype=object)
    else:
        raw = values.to_pandas()
    if pd.api.types.is_datetime64_any_dtype(raw):
        numeric = pd.Series(_epoch_seconds(raw))
        unparsed = np.zeros(len(raw), dtype=bool)
    else:
        numeric = pd.to_numeric(raw, errors="coerce")
        unparsed = np.zeros(len(raw), dtype=bool)  # NaN in a numeric column is no text
        if pd.api.types.is_object_dtype(raw):
            unparsed = np.array(numeric.isna(), dtype=bool)
            # "nan" and "inf" parse as numbers: only the rest may be datetimes
            spelled = raw.astype(str).str.strip().str.lower().str.lstrip("+-")
            unparsed &= ~spelled.isin(["nan", "inf", "infinity"]).to_numpy()
            if unparsed.any():
                numeric = numeric.astype(np.float64)
                numeric[unparsed] = _epoch_seconds(raw[unparsed])
                unparsed &= np.array(numeric.isna(), dtype=bool)
    if pd.api.types.is_integer_dtype(numeric):  # exact: no detour through floats
        too_large = (numeric > np.iinfo(np.int64).max).to_numpy()
        seconds = numeric.to_numpy(np.float64)
        nonfinite = np.zeros(len(raw), dtype=bool)
    else:
        seconds = numeric.to_numpy(np.float64, na_value=np.nan)
        nonfinite = ~np.isfinite(seconds) & ~unparsed
        too_large = np.isfinite(seconds) & (seconds >= _INT64_LIMIT)
    problems = (
        (unparsed, "is neither a number nor an ISO 8601 datetime"),
        (nonfinite, "is not a finite number; times must be seconds since 1970"),
        (seconds < 0, "is negative (or before 1970); times must be >= 0 seconds since 1970-01-01 UTC"),
        (too_large, "does not fit in int64 seconds since 1970 (at most 2**63 - 1): is it in another unit?"),
    )  # fmt: skip
    bad = functools.reduce(np.logical_or, (mask for mask, _ in problems))
    if bad.any():
        i = int(bad.argmax())
        reason = next(text for mask, text in problems if mask[i])
        value = raw.iloc[i]
        value = value.item() if isinstance(value, np.generic) else value
        raise DataError(f"{path}: {where(i)}: {column} {value!r} {reason}")
    if pd.api.types.is_integer_dtype(numeric):
        return numeric.to_numpy(np.int64)
    return np.floor(seconds).astype(np.int64)


def _reject_float_spellings(
    path: Path, ids: NDArray[np.object_], column: str, key: str, where: Locator
) -> None:
    """Raise if an ID is written both as an integer and as a float (``12``, ``12.0``)."""
    matches = pc.match_substring_regex(pa.array(ids, pa.string()), r"^[+-]?\d+\.0+$")
    floats = np.asarray(matches.to_numpy(zero_copy_only=False), dtype=bool)
    if not floats.any():
        return
    uniq, first = np.unique(ids.astype(str), return_index=True)
    row_of = dict(zip(uniq.tolist(), first.tolist(), strict=True))
    for i in np.flatnonzero(floats):
        integer = str(ids[i]).split(".", 1)[0]
        if integer in row_of:
            j = row_of[integer]
            raise DataError(
                f"{path}: {where(int(i))}: {column} {ids[i]!r} and {where(j)}: {column} "
                f"{integer!r} are one number written two ways (a column saved as "
                f"floats?); IDs are compared as text, so they would be two {key}s: "
                "write the IDs as integers"
            )


def _strings(
    path: Path, table: pa.Table, column: str, where: Locator
) -> NDArray[np.object_]:
    """Return a column as strings, raising at the first null or blank value."""
    values = table.column(column)
    if values.null_count:
        i = pc.index(pc.is_null(values), True).as_py()
        raise DataError(f"{path}: {where(i)}: {column} is missing")
    values = pc.cast(values, pa.string())
    blank = pc.equal(pc.utf8_trim_whitespace(values), "")
    if pc.any(blank).as_py():
        i = pc.index(blank, True).as_py()
        raise DataError(f"{path}: {where(i)}: {column} is empty")
    control = pc.match_substring_regex(values, _CONTROL)
    if pc.any(control).as_py():
        i = pc.index(control, True).as_py()
        raise DataError(
            f"{path}: {where(i)}: {column} {values[i].as_py()!r} contains a control "
            "character (a binary or corrupted file?)"
        )
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=object)


def _epoch_seconds(values: pd.Series) -> NDArray[np.float64]:
    """Parse ISO 8601 datetimes (naive ones as UTC) to epoch seconds; NaN on failure."""
    parsed = pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")
    seconds: NDArray[np.float64] = (
        (parsed - _EPOCH) / pd.Timedelta(seconds=1)
    ).to_numpy(np.float64, na_value=np.nan)
    return seconds


def _item_categories(
    path: Path, items: NDArray[np.object_], labels: NDArray[np.object_], where: Locator
) -> dict[str, int]:
    """Map each item to the integer code of its one category label."""
    if pd.Series(labels).str.fullmatch(INTEGER).all():
        codes = labels.astype(np.int64)
    else:
        codes = pd.factorize(labels, sort=True)[0].astype(np.int64)
    frame = pd.DataFrame({"item": items, "code": codes})
    first = frame.groupby("item", sort=False)["code"].transform("first")
    conflict = (frame["code"] != first).to_numpy()
    if conflict.any():
        i = int(conflict.argmax())
        raise DataError(
            f"{path}: {where(i)}: item {items[i]!r} has category {labels[i]!r}, but an "
            "earlier row gives it another; each item needs one category"
        )
    return dict(zip(frame["item"], frame["code"].tolist(), strict=True))
