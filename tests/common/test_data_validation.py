"""Hostile or faulty input files: each is refused naming file, line and column, or works.

Every file a test writes must be unchanged after fedrec read it.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import AppConfig
from common.data.datasets import load_dataset
from common.data.loaders import load_interactions_file
from common.data.movielens import load_movielens_1m, load_movielens_100k
from common.data.pipeline import load_interactions, silo_data
from common.data.split import NO_ITEM, leave_one_out
from common.errors import ConfigError, DataError, DataWarning
from common.run_config import load_default_run_config

HEADER = b"user_id,item_id,timestamp\n"
GOOD = b"a,i1,1\na,i2,2\na,i3,3\nb,i4,4\n"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(kind: str, path: Path, **kw: Any) -> object:
    if kind == "ml-100k":
        return load_movielens_100k(path)
    if kind == "ml-1m":
        return load_movielens_1m(path)
    return load_interactions_file(path, **kw)


def _assert_refused(
    path: Path,
    load: Callable[[], object],
    error: type[Exception],
    fragment: str,
    where: str = "",
) -> None:
    """Assert `load` raises `error` naming `path` and `where`, and leaves the file alone."""
    before = _digest(path) if path.is_file() else None
    with pytest.raises(error) as info:
        load()
    message = str(info.value)
    assert fragment in message
    if error is DataError:
        assert f"{path}{': ' + where if where else ''}" in message
    if before is not None:
        assert _digest(path) == before


# (file name, bytes, loader keyword arguments, location in the message, fragment)
BAD_TEXT: list[Any] = [
    # timestamps that do not fit, are negative or are not numbers
    pytest.param("t.csv", HEADER + b"a,i1,1\nb,i2,1e300\n", {}, "line 3", "timestamp '1e300' does not fit in int64 seconds since 1970", id="timestamp-1e300"),
    pytest.param("t.csv", HEADER + b"a,i1,-1e300\n", {}, "line 2", "timestamp '-1e300' is negative", id="timestamp-minus-1e300"),
    pytest.param("t.csv", HEADER + b"a,i1,1e19\n", {}, "line 2", "'1e19' does not fit in int64", id="timestamp-1e19"),
    pytest.param("t.csv", HEADER + b"a,i1,9.3e18\n", {}, "line 2", "'9.3e18' does not fit in int64", id="timestamp-float-above-int64"),
    pytest.param("t.csv", HEADER + b"a,i1,9223372036854775808\n", {}, "line 2", "'9223372036854775808' does not fit in int64", id="timestamp-2-pow-63"),
    pytest.param("t.csv", HEADER + b"a,i1,99999999999999999999\n", {}, "line 2", "'99999999999999999999' does not fit in int64", id="timestamp-20-digits"),
    pytest.param("t.csv", HEADER + b"a,i1,5\nb,i2,-5\n", {}, "line 3", "timestamp '-5' is negative", id="timestamp-negative-int"),
    pytest.param("t.csv", HEADER + b"a,i1,-0.5\n", {}, "line 2", "'-0.5' is negative", id="timestamp-negative-fraction"),
    pytest.param("t.csv", HEADER + b"a,i1,nan\n", {}, "line 2", "timestamp 'nan' is not a finite number", id="timestamp-nan"),
    pytest.param("t.csv", HEADER + b"a,i1,NaN\n", {}, "line 2", "'NaN' is not a finite number", id="timestamp-NaN"),
    pytest.param("t.csv", HEADER + b"a,i1,inf\n", {}, "line 2", "'inf' is not a finite number", id="timestamp-inf"),
    pytest.param("t.csv", HEADER + b"a,i1,-inf\n", {}, "line 2", "'-inf' is not a finite number", id="timestamp-minus-inf"),
    pytest.param("t.csv", HEADER + b"a,i1,Infinity\n", {}, "line 2", "'Infinity' is not a finite number", id="timestamp-Infinity"),
    pytest.param("t.csv", HEADER + b"a,i1,soon\n", {}, "line 2", "timestamp 'soon' is neither a number nor an ISO 8601 datetime", id="timestamp-word"),
    pytest.param("t.csv", HEADER + b"a,i1,\n", {}, "line 2", "timestamp '' is neither a number", id="timestamp-empty"),
    pytest.param("t.csv", HEADER + b"a,i1,0x10\n", {}, "line 2", "'0x10' is neither a number", id="timestamp-hex"),
    pytest.param("t.csv", HEADER + b"a,i1,1e\n", {}, "line 2", "'1e' is neither a number", id="timestamp-bad-exponent"),
    pytest.param("t.csv", HEADER + b"a,i1,True\n", {}, "line 2", "'True' is neither a number", id="timestamp-bool"),
    pytest.param("t.csv", HEADER + b"a,i1,12:00\n", {}, "line 2", "'12:00' is neither a number", id="timestamp-clock-time"),
    pytest.param("t.csv", HEADER + b"a,i1,2020-13-01\n", {}, "line 2", "'2020-13-01' is neither a number", id="timestamp-month-13"),
    pytest.param("t.csv", HEADER + b"a,i1,1969-12-31T00:00:00\n", {}, "line 2", "is negative (or before 1970)", id="timestamp-before-1970"),
    pytest.param("t.csv", HEADER + b"a,i1,2020-01-01\nb,i2,later\n", {}, "line 3", "'later' is neither", id="timestamp-word-after-dates"),
    pytest.param("t.tsv", b"1\t2\t3\n1\t3\t1e300\n", {"header": False, "user_col": "0", "item_col": "1", "timestamp_col": "2"}, "line 2", "column 2 '1e300' does not fit", id="headerless-timestamp-1e300"),
    pytest.param("t.txt", b"u;i;t\na;b;1,5\n", {"user_col": "u", "item_col": "i", "timestamp_col": "t"}, "line 2", "t '1,5' is neither a number", id="timestamp-decimal-comma"),
    # IDs
    pytest.param("t.csv", HEADER + b"a,i1,1\n,i2,2\n", {}, "line 3", "user_id is empty", id="user-empty"),
    pytest.param("t.csv", HEADER + b"a,,1\n", {}, "line 2", "item_id is empty", id="item-empty"),
    pytest.param("t.csv", HEADER + b"   ,i1,1\n", {}, "line 2", "user_id is empty", id="user-blank"),
    pytest.param("t.csv", HEADER + b"a,12.0,1\nb,12,2\n", {}, "line 2", "item_id '12.0' and line 3: item_id '12' are one number written two ways", id="item-float-and-int"),
    pytest.param("t.csv", HEADER + b"7,i1,1\n7.0,i2,2\n", {}, "line 3", "user_id '7.0' and line 2: user_id '7' are one number", id="user-float-and-int"),
    pytest.param("t.csv", HEADER + b"a,+3.00,1\nb,+3,2\n", {}, "line 2", "'+3.00' and line 3: item_id '+3'", id="item-signed-float-and-int"),
    pytest.param("t.csv", HEADER + b"a\x00,i1,1\n", {}, "line 2", "user_id 'a\\x00' contains a control character", id="user-nul-byte"),
    pytest.param("t.csv", HEADER + b"a,i\x1b1,1\n", {}, "line 2", "contains a control character", id="item-escape-char"),
    pytest.param("t.csv", HEADER + b"a,i1,1\nb,i1\x7f,2\n", {}, "line 3", "contains a control character", id="item-delete-char"),
    pytest.param("t.csv", b"user_id,item_id,timestamp,genre\na,i1,1,rock\nb,i1,2,jazz\n", {"category_col": "genre"}, "line 3", "item 'i1' has category 'jazz'", id="category-conflict"),
    # empty, blank and short files
    pytest.param("t.csv", b"", {}, "", "empty file", id="empty-file"),
    pytest.param("t.csv", b"\n", {}, "", "empty file", id="only-newline"),
    pytest.param("t.csv", b"\r\n", {}, "", "empty file", id="only-crlf"),
    pytest.param("t.csv", b"\n\n\n", {}, "", "empty file", id="only-blank-lines"),
    pytest.param("t.csv", HEADER, {}, "", "no data lines after the header line", id="header-only"),
    pytest.param("t.csv", HEADER.replace(b"\n", b"\r\n"), {}, "", "no data lines after the header line", id="header-only-crlf"),
    pytest.param("t.csv", HEADER + b"\n", {}, "", "no data lines after the header line", id="header-and-blank-line"),
    pytest.param("t.csv", b"\n" + HEADER + GOOD, {}, "line 1", "blank", id="leading-blank-line"),
    pytest.param("t.csv", HEADER + b"a,i1,1\n\nb,i2,2\n", {}, "line 3", "is blank", id="blank-line-inside"),
    pytest.param("t.csv", HEADER + b"a,i1,1\r\n\r\nb,i2,2\r\n", {}, "line 3", "is blank", id="blank-line-inside-crlf"),
    pytest.param("t.csv", b" \n" + GOOD, {}, "line 1", "is blank", id="whitespace-header"),
    # rows of the wrong shape
    pytest.param("t.csv", HEADER + b"a,i1\n", {}, "line 2", "has 2 fields, expected 3 comma-separated fields", id="too-few-fields"),
    pytest.param("t.csv", HEADER + b"a,i1,1,x\n", {}, "line 2", "has 4 fields, expected 3", id="too-many-fields"),
    pytest.param("t.csv", HEADER + b'a,"i1,1\nb,i2,2\n', {}, "line 2", "has 2 fields, expected 3", id="unclosed-quote"),
    pytest.param("t.csv", HEADER + b'a,"i\n1",1\n', {}, "line 2", "a quoted field spans several lines", id="quoted-line-break"),
    pytest.param("t.csv", HEADER + GOOD + HEADER, {}, "line 6", "repeats the header line", id="header-repeated"),
    pytest.param("t.csv", b"user_id,item_id,timestamp,item_id\na,b,1,c\n", {}, "line 1", "duplicate column names", id="duplicate-column-names"),
    # columns that are not there
    pytest.param("t.csv", b"user,item_id,timestamp\na,b,1\n", {}, "", "missing column(s) ['user_id']; the file has columns ['user', 'item_id', 'timestamp']", id="missing-column"),
    pytest.param("t.csv", b"User_ID,item_id,timestamp\na,b,1\n", {}, "", 'names are case- and space-sensitive: set data.user-col = "User_ID"', id="column-name-case"),
    pytest.param("t.csv", b"user_id, item_id,timestamp\na,b,1\n", {}, "", 'set data.item-col = " item_id"', id="column-name-space"),
    pytest.param("t.csv", b"user_id\titem_id\ttimestamp\na\tb\t1\n", {}, "", 'the file looks TAB-separated; set data.sep = "\\t"', id="tab-file-named-csv"),
    pytest.param("t.csv", b"user_id;item_id;timestamp\na;b;1\n", {}, "", 'the file looks semicolon-separated; set data.sep = ";"', id="semicolon-file-named-csv"),
    pytest.param("t.tsv", b"196\t242\t3\t881250949\n", {}, "", "line 1 looks like data, not a header: for a file without one set data.header = false", id="headerless-file-read-with-header"),
    pytest.param("t.csv", HEADER + GOOD, {"timestamp_col": "time"}, "", "missing column(s) ['time']", id="missing-timestamp-column"),
    pytest.param("t.txt", b"user\na\n", {}, "", "cannot tell the field separator from line 1 'user'; set data.sep", id="separator-not-guessable"),
    pytest.param("t.tsv", b"1\t2\n", {"header": False, "user_col": "0", "item_col": "2", "timestamp_col": ""}, "", "line 1 has 2 fields (columns 0 to 1), so there is no column 2 (data.item-col)", id="headerless-index-out-of-range"),
    # line endings and encodings
    pytest.param("t.csv", HEADER.replace(b"\n", b"\r") + b"a,i1,1\r", {}, "line 1", "lone carriage return (classic Mac line endings)", id="cr-line-endings"),
    pytest.param("t.csv", HEADER + b"a,i1,1\rb,i2,2\n", {}, "line 2", "lone carriage return", id="lone-cr-inside"),
    pytest.param("t.csv", "user_id,item_id,timestamp\na,b,1\n".encode("utf-16"), {}, "", "the file is UTF-16; re-save it as UTF-8", id="utf-16"),
    pytest.param("t.csv", "user_id,item_id,timestamp\na,b,1\n".encode("utf-16-be"), {}, "line 1", "holds NUL bytes: the file is binary or UTF-16", id="utf-16-be-without-bom"),
    pytest.param("t.csv", HEADER + b"a,i1,1\nb,caf\xe9,2\n", {}, "line 3, column 'item_id'", "bytes b'\\xe9' are not UTF-8", id="latin-1-byte-in-item"),
    pytest.param("t.csv", HEADER + b"\xff,i1,1\n", {}, "line 2, column 'user_id'", "are not UTF-8", id="invalid-byte-in-user"),
    pytest.param("t.csv", b"user_id,item_id,t\xe9mps\na,b,1\n", {}, "line 1", "is not UTF-8", id="latin-1-byte-in-header"),
    pytest.param("t.tsv", b"1\t2\t3\n1\t\xc3\t4\n", {"header": False, "user_col": "0", "item_col": "1", "timestamp_col": "2"}, "line 2, column 1", "are not UTF-8", id="headerless-truncated-utf-8"),
    pytest.param("t.txt", b"user_id::item_id::timestamp\na::b\x1f::1\n", {}, "", "contains the control character \\x1f", id="unit-separator-with-double-colon"),
    # file types
    pytest.param("t.dat", HEADER + GOOD, {}, "", "unsupported file type '.dat'", id="dat-without-format"),
    pytest.param("t.xlsx", b"PK\x03\x04", {}, "", "unsupported file type '.xlsx'", id="xlsx"),
    pytest.param("t.parquet", HEADER + GOOD, {}, "", "cannot read as Parquet", id="text-named-parquet"),
    pytest.param("t.csv", HEADER + GOOD, {"file_format": "parquet"}, "", "cannot read as Parquet", id="text-read-as-parquet"),
]


@pytest.mark.parametrize(("name", "data", "kw", "where", "fragment"), BAD_TEXT)
def test_bad_text_log_is_refused_naming_file_line_and_column(
    tmp_path: Path, name: str, data: bytes, kw: dict[str, Any], where: str, fragment: str
) -> None:
    # Arrange
    path = tmp_path / name
    path.write_bytes(data)
    # Act / Assert
    _assert_refused(path, lambda: load_interactions_file(path, **kw), DataError, fragment, where)


def _parquet(path: Path, **columns: pa.Array) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


USERS = pa.array(["a", "b"])
ITEMS = pa.array(["i1", "i2"])
BAD_PARQUET: list[Any] = [
    pytest.param({"timestamp": pa.array([1.0, 1e300])}, "row 2", "timestamp 1e+300 does not fit in int64", id="parquet-float-1e300"),
    pytest.param({"timestamp": pa.array([1.0, float("nan")])}, "row 2", "timestamp nan is not a finite number", id="parquet-nan"),
    pytest.param({"timestamp": pa.array([float("inf"), 1.0])}, "row 1", "timestamp inf is not a finite number", id="parquet-inf"),
    pytest.param({"timestamp": pa.array([1, 2**63], pa.uint64())}, "row 2", "9223372036854775808 does not fit in int64", id="parquet-uint64-above-int64"),
    pytest.param({"timestamp": pa.array([-1, 3])}, "row 1", "timestamp -1 is negative", id="parquet-negative-int"),
    pytest.param({"timestamp": pa.array([1, None])}, "row 2", "timestamp is missing", id="parquet-null-timestamp"),
    pytest.param({"timestamp": pa.array(pd.to_datetime(["1960-01-01", "2020-01-01"]))}, "row 1", "is negative (or before 1970)", id="parquet-datetime-before-1970"),
    pytest.param({"timestamp": pa.array(["1", "soon"])}, "row 2", "timestamp 'soon' is neither", id="parquet-string-timestamp"),
    pytest.param({"user_id": pa.array(["a", None])}, "row 2", "user_id is missing", id="parquet-null-user"),
    pytest.param({"item_id": pa.array([None, "i2"])}, "row 1", "item_id is missing", id="parquet-null-item"),
    pytest.param({"item_id": pa.array(["", "i2"])}, "row 1", "item_id is empty", id="parquet-empty-item"),
    pytest.param({"item_id": pa.array(["5", "5.0"])}, "row 2", "item_id '5.0' and row 1: item_id '5'", id="parquet-float-spelled-item"),
]


@pytest.mark.parametrize(("columns", "where", "fragment"), BAD_PARQUET)
def test_bad_parquet_log_is_refused_naming_file_row_and_column(
    tmp_path: Path, columns: dict[str, pa.Array], where: str, fragment: str
) -> None:
    # Arrange
    full = {"user_id": USERS, "item_id": ITEMS, "timestamp": pa.array([1, 2]), **columns}
    path = _parquet(tmp_path / "log.parquet", **full)
    # Act / Assert
    _assert_refused(path, lambda: load_interactions_file(path), DataError, fragment, where)


U_ROWS = b"1\t10\t3\t881250949\n2\t20\t4\t891717742\n"
BAD_MOVIELENS: list[Any] = [
    pytest.param("ml-100k", "u.data", U_ROWS + b"3\t30\t5\t-1\n", "line 3", "timestamp -1 is negative", id="ml100k-negative-timestamp"),
    pytest.param("ml-100k", "u.data", U_ROWS + b"3\t30\t5\t1e300\n", "line 3", "timestamp '1e300' is not an integer", id="ml100k-float-timestamp"),
    pytest.param("ml-100k", "u.data", U_ROWS + b"3\t30\t5\t9223372036854775808\n", "line 3", "is not an integer", id="ml100k-19-digit-timestamp"),
    pytest.param("ml-100k", "u.data", U_ROWS + b"3\t30\tfive\t1\n", "line 3", "rating 'five' is not a number", id="ml100k-rating-word"),
    pytest.param("ml-100k", "u.data", U_ROWS + b"3\t30.0\t5\t1\n", "line 3", "item_id '30.0' is not an integer", id="ml100k-float-item"),
    pytest.param("ml-100k", "u.data", U_ROWS.replace(b"\n", b"\r"), "line 1", "lone carriage return", id="ml100k-cr-line-endings"),
    pytest.param("ml-100k", "u.data", U_ROWS + b"3\t3\xe9\t5\t1\n", "line 3, column 'item_id'", "are not UTF-8", id="ml100k-latin-1-byte"),
    pytest.param("ml-100k", "u.data", U_ROWS + b"3\t30\t5\n", "line 3", "has 3 fields, expected 4", id="ml100k-short-line"),
    pytest.param("ml-1m", "ratings.dat", b"1::10::3::978300760\n1::20::3\n", "line 2", "has 3 fields, expected 4", id="ml1m-short-line"),
    pytest.param("ml-1m", "ratings.dat", b"1::10::3::-978300760\n", "line 1", "timestamp -978300760 is negative", id="ml1m-negative-timestamp"),
]


@pytest.mark.parametrize(("kind", "name", "data", "where", "fragment"), BAD_MOVIELENS)
def test_bad_movielens_file_is_refused_naming_file_line_and_column(
    tmp_path: Path, kind: str, name: str, data: bytes, where: str, fragment: str
) -> None:
    # Arrange
    path = tmp_path / name
    path.write_bytes(data)
    # Act / Assert
    _assert_refused(path, lambda: _load(kind, tmp_path), DataError, fragment, where)


BAD_SETTINGS: list[Any] = [
    pytest.param({"sep": "#"}, "data.sep: unsupported separator '#'", id="sep-hash"),
    pytest.param({"sep": ",,"}, "data.sep: unsupported separator ',,'", id="sep-two-commas"),
    pytest.param({"file_format": "xlsx"}, "file_format must be 'csv' or 'parquet'", id="format-unknown"),
    pytest.param({"header": False, "user_col": "user_id"}, 'data.user-col: with data.header = false columns are 0-based indices (e.g. data.user-col = "0")', id="headerless-name-column"),
    pytest.param({"header": False, "user_col": "0", "item_col": "-1"}, "data.item-col: with data.header = false", id="headerless-negative-index"),
]


@pytest.mark.parametrize(("kw", "fragment"), BAD_SETTINGS)
def test_bad_reading_settings_are_config_errors(tmp_path: Path, kw: dict[str, Any], fragment: str) -> None:
    # Arrange
    path = tmp_path / "log.csv"
    path.write_bytes(HEADER + GOOD)
    # Act / Assert
    _assert_refused(path, lambda: load_interactions_file(path, **kw), ConfigError, fragment)


def test_missing_file_directory_and_parquet_named_csv_are_refused(tmp_path: Path) -> None:
    # Arrange
    folder = tmp_path / "log.csv"
    folder.mkdir()
    parquet = _parquet(tmp_path / "p.csv", user_id=USERS, item_id=ITEMS, timestamp=pa.array([1, 2]))
    # Act / Assert
    _assert_refused(tmp_path / "nope.csv", lambda: load_interactions_file(tmp_path / "nope.csv"), DataError, "file not found")
    _assert_refused(folder, lambda: load_interactions_file(folder), DataError, "is a directory; expected an interaction log file")
    _assert_refused(parquet, lambda: load_dataset("csv", parquet), DataError, 'this is a Parquet file; set data.dataset = "parquet"')


# Inputs that work


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_crlf_line_endings_read_like_lf(tmp_path: Path) -> None:
    # Arrange
    lf = _write(tmp_path / "lf.csv", HEADER + GOOD)
    crlf = _write(tmp_path / "crlf.csv", (HEADER + GOOD).replace(b"\n", b"\r\n"))
    before = _digest(crlf)
    # Act
    a, b = load_interactions_file(lf), load_interactions_file(crlf)
    # Assert
    assert b.item_ids.tolist() == a.item_ids.tolist() == ["i1", "i2", "i3", "i4"]
    np.testing.assert_array_equal(a.timestamp, b.timestamp)
    assert _digest(crlf) == before


def test_utf8_byte_order_mark_is_skipped(tmp_path: Path) -> None:
    # Act
    data = load_interactions_file(_write(tmp_path / "bom.csv", b"\xef\xbb\xbf" + HEADER + GOOD))
    # Assert
    assert data.user_ids.tolist() == ["a", "b"]


def test_tab_separated_dat_with_crlf_and_no_timestamp_loads_as_csv(tmp_path: Path) -> None:
    # Arrange: the measured failure, a real export
    text = b"user\tsong\r\n" + b"".join(f"u{u}\ts{(3 * u + j) % 9}\r\n".encode() for u in range(4) for j in range(4))
    path = _write(tmp_path / "plays.dat", text)
    before = _digest(path)
    # Act
    data = load_dataset("csv", path, user_col="user", item_col="song", timestamp_col="", sep="\t")
    split = leave_one_out(data, num_negatives=3, seed=1)
    # Assert
    assert (len(data), data.num_users, data.num_items) == (16, 4, 9)
    assert data.item_ids[0] == "s0"  # no stray carriage return
    assert not data.has_time and (data.timestamp == 0).all()
    assert split.order == "random"
    assert (split.test_item != NO_ITEM).all()
    assert _digest(path) == before


def test_the_separator_is_inferred_from_the_first_line_of_a_dat_file(tmp_path: Path) -> None:
    # Arrange
    path = _write(tmp_path / "log.dat", (HEADER + GOOD).replace(b",", b"|"))
    # Act
    data = load_dataset("csv", path)
    # Assert
    assert data.item_ids.tolist() == ["i1", "i2", "i3", "i4"]


def test_a_tsv_link_to_a_dat_file_names_the_real_file(tmp_path: Path) -> None:
    # Arrange
    real = _write(tmp_path / "ratings.dat", b"user_id\titem_id\ttimestamp\na\tb\t1e300\n")
    link = tmp_path / "ratings.tsv"
    os.symlink(real.name, link)
    # Act / Assert
    _assert_refused(real, lambda: load_interactions_file(link), DataError, "timestamp '1e300' does not fit", "line 2")
    ok = _write(tmp_path / "ok.dat", b"user_id\titem_id\ttimestamp\na\tb\t1\n")
    os.symlink(ok.name, tmp_path / "ok.tsv")
    assert load_interactions_file(tmp_path / "ok.tsv").source == str(ok)


@pytest.mark.parametrize(
    ("sep", "text"),
    [
        ("\t", b"user_id\titem_id\ttimestamp\na\ti1\t1\n"),
        (",", b"user_id,item_id,timestamp\na,i1,1\n"),
        (";", b"user_id;item_id;timestamp\na;i1;1\n"),
        ("|", b"user_id|item_id|timestamp\na|i1|1\n"),
        (" ", b"user_id item_id timestamp\na i1 1\n"),
        ("::", b"user_id::item_id::timestamp\na::i1::1\n"),
    ],
    ids=["tab", "comma", "semicolon", "pipe", "space", "double-colon"],
)
def test_every_separator_reads_any_suffix(tmp_path: Path, sep: str, text: bytes) -> None:
    # Act
    data = load_interactions_file(_write(tmp_path / "log.dat", text), sep=sep, file_format="csv")
    # Assert
    assert (data.user_ids.tolist(), data.item_ids.tolist(), data.timestamp.tolist()) == (["a"], ["i1"], [1])


def test_a_headerless_file_takes_column_indices(tmp_path: Path) -> None:
    # Arrange
    path = _write(tmp_path / "u.tsv", b"196\t242\t3\t881250949\r\n186\t302\t3\t891717742\r\n")
    # Act
    data = load_interactions_file(path, header=False, user_col="0", item_col="1", timestamp_col="3")
    # Assert
    assert data.user_ids.tolist() == ["196", "186"]
    assert data.timestamp.tolist() == [881250949, 891717742]
    assert (data.time_column, data.locate(0)) == ("column 3", "line 1")


def test_timestamps_up_to_int64_are_exact_and_fractions_floored(tmp_path: Path) -> None:
    # Arrange
    integers = b"a,i1,9223372036854775807\na,i2,9223372036854775806\n"
    mixed = b"a,i1,1600000000000.9\na,i2,1970-01-01T00:00:05Z\na,i3,7\n"
    # Act
    exact = load_interactions_file(_write(tmp_path / "int.csv", HEADER + integers))
    floored = load_interactions_file(_write(tmp_path / "mixed.csv", HEADER + mixed))
    # Assert
    assert exact.timestamp.tolist() == [2**63 - 1, 2**63 - 2]
    assert floored.timestamp.tolist() == [1_600_000_000_000, 5, 7]


def test_negative_user_ids_are_ids_like_any_other(tmp_path: Path) -> None:
    # Act
    data = load_interactions_file(_write(tmp_path / "t.csv", HEADER + b"-5,i1,1\n-5,i2,2\n5,i3,3\n"))
    # Assert
    assert data.user_ids.tolist() == ["-5", "5"]
    assert data.user_idx.tolist() == [0, 0, 1]


def test_float_spelled_ids_written_one_way_are_kept_as_written(tmp_path: Path) -> None:
    # Act
    data = load_interactions_file(_write(tmp_path / "t.csv", HEADER + b"a,12.0,1\nb,13.0,2\n"))
    # Assert
    assert data.item_ids.tolist() == ["12.0", "13.0"]


def test_a_user_with_fewer_than_three_interactions_stays_train_only(tmp_path: Path) -> None:
    # Arrange
    rows = b"".join(f"u{u},i{(u + j) % 12},{j}\n".encode() for u in range(5) for j in range(4))
    path = _write(tmp_path / "t.csv", HEADER + rows + b"short,i0,1\nshort,i1,2\n")
    # Act
    data = load_interactions_file(path)
    split = leave_one_out(data, num_negatives=3, seed=0)
    # Assert
    short = int(np.flatnonzero(data.user_ids == "short")[0])
    assert split.test_item[short] == split.val_item[short] == NO_ITEM
    assert (split.train_user == short).sum() == 2


def test_a_file_with_one_user_cannot_give_negatives_and_says_why(tmp_path: Path) -> None:
    # Arrange: the one user has seen the whole catalogue
    path = _write(tmp_path / "one.csv", HEADER + b"solo,i1,1\nsolo,i2,2\nsolo,i3,3\n")
    data = load_interactions_file(path)
    # Act / Assert
    message = f"{path}: user 'solo' has interacted with 3 of the 3 items, so 1 unseen evaluation negatives cannot be sampled; the log needs a larger catalogue"
    _assert_refused(path, lambda: leave_one_out(data, num_negatives=1, seed=0), DataError, message)


def test_a_file_with_one_user_stops_the_pipeline_naming_the_file(tmp_path: Path) -> None:
    # Arrange: whatever the silos, one user leaves no item to sample negatives from
    path = _write(tmp_path / "one.csv", HEADER + b"solo,i1,1\nsolo,i2,2\nsolo,i3,3\n")
    settings = _settings(path)
    # Act / Assert
    _assert_refused(path, lambda: silo_data(settings.data, 1, 0, 2), DataError, f"{path}: user 'solo' has interacted with 3 of the 3 items")


def test_duplicate_rows_in_a_file_warn_with_file_count_and_line(tmp_path: Path) -> None:
    # Arrange: b's latest item repeated, twice
    rows = b"a,i1,1\na,i2,2\na,i3,3\nb,i4,1\nb,i5,2\nb,i6,3\nb,i6,4\nb,i6,5\nc,i7,1\n"
    path = _write(tmp_path / "dup.csv", HEADER + rows)
    before = _digest(path)
    data = load_interactions_file(path)
    # Act
    with pytest.warns(DataWarning) as record:
        split = leave_one_out(data, num_negatives=2, seed=0)
    # Assert
    assert str(record[0].message) == (
        f"{path}: dropped 2 duplicate (user, item) rows, keeping the earliest of each pair "
        "(by time, then file order); e.g. line 8 repeats user 'b' and item 'i6' of line 7"
    )
    b = int(np.flatnonzero(data.user_ids == "b")[0])
    assert data.item_ids[split.test_item[b]] == "i6"
    assert data.item_ids[split.val_item[b]] == "i5"
    assert _digest(path) == before


def test_ties_in_a_file_warn_with_the_count_and_the_rule(tmp_path: Path) -> None:
    # Arrange
    rows = b"a,i1,1\na,i2,2\na,i3,2\nb,i4,1\nb,i5,2\nb,i6,3\n"
    path = _write(tmp_path / "ties.csv", HEADER + rows)
    before = _digest(path)
    data = load_interactions_file(path)
    # Act / Assert
    with pytest.warns(DataWarning, match=re.escape(f"{path}: for 1 of 2 users the test or validation item was decided by a tie in 'timestamp'; ties are broken by a stable sort by time, then file order")):
        leave_one_out(data, num_negatives=2, seed=0)
    assert _digest(path) == before


def test_a_play_count_used_as_timestamp_is_flagged(tmp_path: Path) -> None:
    # Arrange: counts, not times: every user's two largest counts tie
    rows = b"".join(f"u{u},i{u}{j},{min(j, 2)}\n".encode() for u in range(4) for j in range(4))
    path = _write(tmp_path / "plays.csv", b"user_id,item_id,plays\n" + rows)
    before = _digest(path)
    data = load_interactions_file(path, timestamp_col="plays")
    # Act
    with pytest.warns(DataWarning) as record:
        leave_one_out(data, num_negatives=2, seed=0)
    # Assert: the tie count, then the verdict on the column
    messages = [str(w.message) for w in record]
    assert messages[0].startswith(f"{path}: for 4 of 4 users the test or validation item was decided by a tie in 'plays'")
    assert messages[1].startswith(f"{path}: column 'plays' does not look like a timestamp: for 4 of 4 users")
    assert _digest(path) == before


# Config: data.sep, data.header, data.timestamp-col = "" and the eval.k cross-check


def _settings(path: Path, **overrides: Any) -> AppConfig:
    run_config = load_default_run_config()
    run_config.update({"data.dataset": "csv", "data.path": str(path), "data.eval-negatives": 3, "eval.k": 2})
    run_config.update(overrides)
    return AppConfig.from_run_config(run_config)


def test_reading_defaults_come_from_pyproject() -> None:
    # Act
    data = AppConfig.from_run_config(load_default_run_config()).data
    # Assert
    assert (data.sep, data.header, data.timestamp_col) == ("", True, "timestamp")


@pytest.mark.parametrize(
    ("spelling", "sep"),
    [("tab", "\t"), ("\t", "\t"), ("comma", ","), (";", ";"), ("semicolon", ";"), ("pipe", "|"), ("space", " "), ("::", "::"), ("double-colon", "::"), ("", "")],
)
def test_data_sep_takes_characters_and_words(tmp_path: Path, spelling: str, sep: str) -> None:
    # Act / Assert
    assert _settings(tmp_path / "x.csv", **{"data.sep": spelling}).data.sep == sep


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"data.sep": "#"}, "data.sep: expected one of"),
        ({"data.sep": "tab", "data.dataset": "ml-100k"}, "data.sep: only a delimited text log (data.dataset = \"csv\")"),
        ({"data.header": False, "data.dataset": "parquet"}, "data.header: only a delimited text log"),
        ({"data.header": False}, 'data.user-col: with data.header = false columns are 0-based indices (e.g. data.user-col = "0"), got \'user_id\''),
        ({"data.header": False, "data.user-col": "0", "data.item-col": "1"}, "data.timestamp-col: with data.header = false"),
        ({"data.header": "no"}, "data.header: expected true or false"),
        ({"eval.k": 4}, "eval.k: 4 is not below the 4 candidates each user ranks (data.eval-negatives = 3, plus the held-out item)"),
        ({"eval.k": 10, "data.eval-negatives": 5}, "lower eval.k or raise data.eval-negatives"),
    ],
    ids=[
        "sep-unknown",
        "sep-with-movielens",
        "headerless-parquet",
        "headerless-with-column-names",
        "headerless-timestamp-name",
        "header-not-a-bool",
        "eval-k-equals-candidates",
        "eval-k-above-candidates",
    ],
)
def test_bad_data_settings_name_the_key(tmp_path: Path, overrides: dict[str, Any], fragment: str) -> None:
    # Act / Assert
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path / "x.csv", **overrides)
    assert fragment in str(info.value)


def test_eval_k_up_to_the_negatives_is_accepted(tmp_path: Path) -> None:
    # Act / Assert: 3 negatives + the held-out item: K = 3 still ranks
    assert _settings(tmp_path / "x.csv", **{"eval.k": 3}).eval.k == 3


def test_headerless_settings_without_time_run_through_the_pipeline(tmp_path: Path) -> None:
    # Arrange
    rows = "".join(f"{u}\t{(5 * u + j) % 30}\r\n" for u in range(12) for j in range(5))
    path = _write(tmp_path / "log.dat", rows.encode())
    cfg = _settings(path, **{"data.header": False, "data.user-col": "0", "data.item-col": "1", "data.timestamp-col": "", "data.sep": "tab"})
    # Act
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_interactions(cfg.data, cfg.seed)
        silo = silo_data(cfg.data, cfg.seed, 1, 3)
        again = silo_data(cfg.data, cfg.seed, 1, 3)
    # Assert
    assert (len(data), data.num_users) == (60, 12)
    assert silo.split.order == "random"
    np.testing.assert_array_equal(silo.split.test_item, again.split.test_item)


def test_the_pipeline_passes_the_separator_to_a_csv_log(tmp_path: Path) -> None:
    # Arrange
    path = _write(tmp_path / "log.csv", (HEADER + GOOD).replace(b",", b";"))
    # Act
    data = load_interactions(_settings(path, **{"data.sep": "semicolon"}).data, 0)
    # Assert
    assert data.item_ids.tolist() == ["i1", "i2", "i3", "i4"]
