"""Reading delimited text tables line by line, and checking their columns, with errors that name the line."""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from numpy.typing import NDArray

from common.errors import DataError

INTEGER = r"^[+-]?\d{1,18}$"  # at most 18 digits, so the value fits in int64
NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_FIELD_SEP = "\x1f"  # ASCII unit separator: stands in for multi-character separators
#: Field separators of text logs, by their names in messages ("::" is ML-1M's).
SEP_NAMES = {
    "\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe", " ": "space", "::": "double-colon",
}  # fmt: skip

# Maps a 0-based data-row index to a location such as "line 7" for error messages.
Locator = Callable[[int], str]


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
            f"{row.expected_columns} {SEP_NAMES.get(given_sep, repr(given_sep))}-"
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
    require_pattern(path, table, column, INTEGER, "is not an integer", where)
    return np.asarray(pc.cast(table.column(column), pa.int64()), dtype=np.int64)
