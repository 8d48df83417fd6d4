"""Loaders of interaction logs from CSV/TSV/Parquet files, and the text-table readers they share."""

from __future__ import annotations

import csv
import functools
import io
import os
import re
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
#: Field separators of text logs, by their names in messages ("::" is ML-1M's).
_SEP_NAMES = {
    "\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe", " ": "space", "::": "double-colon",
}  # fmt: skip
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
    if sep and sep not in _SEP_NAMES:
        raise ConfigError(
            f"data.sep: unsupported separator {sep!r}; use one of "
            f"{', '.join(repr(s) for s in _SEP_NAMES)}"
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
    lone_cr = re.search(rb"\r(?!\n)", data) if b"\r" in data else None
    if lone_cr is not None:
        line = data.count(b"\n", 0, lone_cr.start()) + 1
        raise DataError(
            f"{path}: line {line} ends with a lone "
            "carriage return (classic Mac line endings); re-save the file with LF or "
            "CRLF line endings"
        )
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
            if encoding == "utf8":
                _require_utf8(path, data, sep, names)
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


def _require_utf8(path: Path, data: bytes, sep: str, names: list[str]) -> None:
    """Raise at the line and column of the first bytes that are not UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        field = data.count(sep.encode(), start, exc.start)
        column = _label(names[field]) if field < len(names) else f"field {field + 1}"
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}: line {line}, {column}: bytes "
            f"{data[exc.start : exc.end]!r} are not UTF-8 ({exc.reason}); re-save the "
            "file as UTF-8"
        ) from None


def _label(column: str) -> str:
    """Name a column in messages: ``column 2`` (headerless) or ``column 'item_id'``."""
    return column if column.startswith("column ") else f"column {column!r}"


def _first_blank_line(data: bytes) -> int | None:
    """Return the 1-based number of the first blank line, or None."""
    if data.startswith((b"\n", b"\r\n")):
        return 1
    ends = [i for i in (data.find(b"\n\n"), data.find(b"\n\r\n")) if i >= 0]
    return data.count(b"\n", 0, min(ends)) + 2 if ends else None


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
    sep = max(_SEP_NAMES, key=header.count)
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
        others = [s for s in _SEP_NAMES if s != sep and s in first_line]
        if others:
            other = max(others, key=first_line.count)
            label = "TAB" if other == "\t" else _SEP_NAMES[other]
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
