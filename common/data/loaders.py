"""Loaders of interaction logs from CSV/TSV/Parquet files, and the text-table readers they share."""

from __future__ import annotations

import csv
import functools
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from numpy.typing import NDArray

from common.data.schema import Interactions
from common.errors import ConfigError, DataError

_INTEGER = r"^[+-]?\d{1,18}$"  # at most 18 digits, so the value fits in int64
NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_FIELD_SEP = "\x1f"  # ASCII unit separator: stands in for multi-character separators
_SEP_NAMES = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe", " ": "space"}
_TEXT_SEPS = {".csv": ",", ".tsv": "\t"}
_PARQUET_SUFFIXES = (".parquet", ".pq")
_EPOCH = pd.Timestamp(0, tz="UTC")

# Maps a 0-based data-row index to a location such as "line 7" for error messages.
Locator = Callable[[int], str]


def load_interactions_file(
    path: Path,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    timestamp_col: str = "timestamp",
    category_col: str | None = None,
    sep: str | None = None,
) -> Interactions:
    """Load an interaction log from a CSV file with a header or from a Parquet file.

    IDs may be any non-empty strings. A timestamp is a number (seconds, floored to
    an integer) or an ISO 8601 datetime (naive ones are read as UTC), stored as
    integer seconds since the Unix epoch. Categories, if given, are integers or
    names; names are numbered in sorted order.

    Parameters
    ----------
    path : Path
        A ``.csv``, ``.tsv`` or ``.txt`` file with a header line, or a ``.parquet``
        or ``.pq`` file.
    user_col, item_col, timestamp_col : str
        Names of the user ID, item ID and timestamp columns.
    category_col : str or None
        Name of the item category column; each item must have one category.
    sep : str or None
        Field separator of a text file. By default ``,`` for ``.csv``, tab for
        ``.tsv``, and for ``.txt`` the most frequent of tab, comma, semicolon, pipe
        and space in the header line.

    Returns
    -------
    Interactions
        One row per data row, in file order.

    Raises
    ------
    DataError
        If the file is missing, empty or malformed, or lacks a column; the message
        names the file and the 1-based line (text) or row (Parquet) number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected an interaction log)")
    columns = {"user": user_col, "item": item_col, "timestamp": timestamp_col}
    if category_col is not None:
        columns["category"] = category_col
    suffix = path.suffix.lower()
    if suffix in _PARQUET_SUFFIXES:
        try:
            found = pq.read_schema(path).names
            _check_columns(path, columns, found)
            table = pq.read_table(path, columns=list(dict.fromkeys(columns.values())))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: cannot read as Parquet: {exc}") from exc
        return _from_table(path, table, columns, lambda i: f"row {i + 1}")
    if suffix not in (*_TEXT_SEPS, ".txt"):
        raise DataError(
            f"{path}: unsupported file type {suffix!r}; expected .csv, .tsv, .txt, "
            ".parquet or .pq"
        )
    header = _header(path)
    sep = sep or _TEXT_SEPS.get(suffix) or _guess_sep(path, header)
    if len(sep) != 1:
        raise ConfigError(f"sep must be one character, got {sep!r}")
    names = next(csv.reader([header], delimiter=sep))
    _check_columns(path, columns, names)
    if len(set(names)) != len(names):
        raise DataError(f"{path}: line 1: duplicate column names in header {names}")
    table = read_text_table(path, names, sep=sep, quoted=True)
    rows = table.slice(1)  # row 0 is the header itself
    if rows.num_rows == 0:
        raise DataError(f"{path}: no data lines after the header line")
    repeated = pc.and_(
        pc.equal(rows.column(user_col), user_col),
        pc.equal(rows.column(item_col), item_col),
    )
    if pc.any(repeated).as_py():
        line = pc.index(repeated, True).as_py() + 2
        raise DataError(f"{path}: line {line} repeats the header line; remove it")
    return _from_table(path, rows, columns, lambda i: f"line {i + 2}")


def data_line(i: int) -> str:
    """Locate data row `i` of a headerless text file."""
    return f"line {i + 1}"


def resolve_file(path: Path, file_name: str) -> Path:
    """Return the data file: `path` itself, or `file_name` inside directory `path`."""
    data_file = path / file_name if path.is_dir() else path
    if not data_file.is_file():
        where = path if path.is_dir() else path.parent
        raise DataError(f"{data_file}: not found (expected {file_name} in {where})")
    return data_file


def read_text_table(
    path: Path,
    names: list[str],
    *,
    sep: str,
    quoted: bool = False,
    encoding: str = "utf8",
) -> pa.Table:
    """Read a delimited text file into string columns, one row per line.

    Row ``i`` of the result is line ``i + 1`` of the file: blank lines and rows
    with the wrong number of fields raise instead of being skipped. Trailing line
    breaks at the end of the file are ignored.
    """
    data = path.read_bytes().rstrip(b"\r\n")
    if not data.strip():
        raise DataError(f"{path}: empty file (no data lines)")
    given_sep = sep
    if len(sep) > 1:  # pyarrow accepts only one-character separators
        if _FIELD_SEP.encode() in data:
            raise DataError(f"{path}: contains the control character \\x1f")
        data, sep = data.replace(sep.encode(), _FIELD_SEP.encode()), _FIELD_SEP
    blank = _first_blank_line(data)
    if blank is not None:
        raise DataError(f"{path}: line {blank} is blank; remove it")
    bad_rows: list[pacsv.InvalidRow] = []

    def on_bad_row(row: pacsv.InvalidRow) -> str:
        bad_rows.append(row)
        return "error"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(
                column_names=names, use_threads=False, encoding=encoding
            ),  # single-threaded: pyarrow knows line numbers of bad rows only then
            parse_options=pacsv.ParseOptions(
                delimiter=sep,
                quote_char='"' if quoted else False,
                ignore_empty_lines=False,
                invalid_row_handler=on_bad_row,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        if not bad_rows:
            raise DataError(f"{path}: cannot parse: {exc}") from exc
        row = bad_rows[0]
        raise DataError(
            f"{path}: line {row.number} has {row.actual_columns} fields, expected "
            f"{row.expected_columns} {_SEP_NAMES.get(given_sep, repr(given_sep))}-"
            f"separated fields ({', '.join(names)}): "
            f"{row.text.replace(_FIELD_SEP, given_sep)!r}"
        ) from None
    if table.num_rows != data.count(b"\n") + 1:  # a quoted field holds a line break
        spans = functools.reduce(
            pc.or_, [pc.match_substring(c, "\n") for c in table.columns]
        )
        line = pc.index(spans, True).as_py() + 1
        raise DataError(
            f"{path}: line {line}: a quoted field spans several lines; line breaks "
            "inside fields are not supported"
        )
    return table


def _first_blank_line(data: bytes) -> int | None:
    """Return the 1-based number of the first blank line, or None."""
    if data.startswith((b"\n", b"\r\n")):
        return 1
    ends = [i for i in (data.find(b"\n\n"), data.find(b"\n\r\n")) if i >= 0]
    return data.count(b"\n", 0, min(ends)) + 2 if ends else None


def _header(path: Path) -> str:
    """Return the first line of a text file, which must be a header."""
    with path.open("rb") as file:
        first = file.readline()
    try:
        header = first.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: line 1 is not UTF-8 ({exc.reason}); re-save the file as UTF-8"
        ) from None
    if not header.strip():
        problem = "line 1 is blank" if path.read_bytes().strip() else "empty file"
        raise DataError(f"{path}: {problem}; expected a header line naming the columns")
    return header


def _guess_sep(path: Path, header: str) -> str:
    """Return the most frequent candidate separator in the header line."""
    sep = max(_SEP_NAMES, key=header.count)
    if sep not in header:
        raise DataError(
            f"{path}: cannot tell the field separator from the header {header!r}; "
            "pass sep="
        )
    return sep


def _check_columns(path: Path, columns: dict[str, str], found: list[str]) -> None:
    """Raise if a requested column is not among the columns found."""
    missing = [c for c in columns.values() if c not in found]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; the file has columns {found}"
        )


def require_pattern(
    path: Path, table: pa.Table, column: str, pattern: str, problem: str, where: Locator
) -> None:
    """Raise at the first value of a string column that does not match `pattern`."""
    ok = pc.match_substring_regex(table.column(column), pattern)
    if not pc.all(ok).as_py():
        i = pc.index(ok, False).as_py()
        value = table.column(column)[i].as_py()
        raise DataError(f"{path}: {where(i)}: {column} {value!r} {problem}")


def integer_column(
    path: Path, table: pa.Table, column: str, where: Locator
) -> NDArray[np.int64]:
    """Parse a string column of integers, raising at the first non-integer."""
    require_pattern(path, table, column, _INTEGER, "is not an integer", where)
    return np.asarray(pc.cast(table.column(column), pa.int64()), dtype=np.int64)


def _from_table(
    path: Path, table: pa.Table, columns: dict[str, str], where: Locator
) -> Interactions:
    """Validate the mapped columns of a CSV or Parquet table and build interactions."""
    keys = ("user", "item", "category") if "category" in columns else ("user", "item")
    ids = {key: _strings(path, table, columns[key], where) for key in keys}
    timestamp = _seconds(table.column(columns["timestamp"]).to_pandas())
    bad = ~np.isfinite(timestamp)
    if bad.any():
        i = int(bad.argmax())
        value = table.column(columns["timestamp"])[i].as_py()
        raise DataError(
            f"{path}: {where(i)}: {columns['timestamp']} {value!r} is neither a "
            "number nor an ISO 8601 datetime"
        )
    categories = None
    if "category" in columns:
        categories = _item_categories(path, ids["item"], ids["category"], where)
    return Interactions.from_external_ids(
        ids["user"],
        ids["item"],
        np.floor(timestamp).astype(np.int64),
        source=str(path),
        item_category=categories,
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
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=object)


def _seconds(values: pd.Series) -> NDArray[np.float64]:
    """Return timestamps as seconds since the epoch; NaN where unparseable."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return _epoch_seconds(values)
    numeric = pd.to_numeric(values, errors="coerce")
    seconds: NDArray[np.float64] = numeric.to_numpy(
        np.float64, na_value=np.nan, copy=True
    )
    text = np.isnan(seconds)
    if text.any() and not pd.api.types.is_numeric_dtype(values):
        seconds[text] = _epoch_seconds(values[text])
    return seconds


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
    if pd.Series(labels).str.fullmatch(_INTEGER).all():
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
