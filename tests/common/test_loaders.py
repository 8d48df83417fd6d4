"""Tests of the MovieLens, CSV and Parquet loaders on tiny files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.data.datasets import load_dataset
from common.data.loaders import load_interactions_file
from common.data.movielens import GENRES, load_movielens_1m, load_movielens_100k
from common.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
U_DATA = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t377\t1\t878887116\n"
CSV = (
    "user_id,item_id,timestamp,genre\n"
    "alice,i1,100,rock\nbob,i2,200,jazz\nalice,i2,300,jazz\n"
)


def _u_item_line(item_id: int, *genres: str) -> str:
    flags = ["1" if g in genres else "0" for g in GENRES]
    return "|".join(
        [str(item_id), f"Movie {item_id} (1995)", "01-Jan-1995", "", "url", *flags]
    )


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


# MovieLens-100K


def test_ml100k_parses_ids_timestamps_and_first_genre(tmp_path: Path) -> None:
    # Arrange
    _write(tmp_path / "u.data", U_DATA)
    items = [_u_item_line(242, "Comedy", "Drama"), _u_item_line(302)]
    _write(tmp_path / "u.item", "\n".join(items) + "\n", encoding="latin-1")
    # Act
    data = load_movielens_100k(tmp_path)
    # Assert
    assert len(data) == 3
    assert data.user_ids.tolist() == ["196", "186"]
    assert data.item_ids.tolist() == ["242", "302", "377"]
    assert data.user_idx.tolist() == [0, 1, 0]
    assert data.timestamp.tolist() == [881250949, 891717742, 878887116]
    assert data.item_category is not None
    assert data.item_category.tolist() == [GENRES.index("Comedy"), -1, -1]


def test_ml100k_accepts_the_file_and_needs_no_u_item(tmp_path: Path) -> None:
    # Arrange
    path = _write(tmp_path / "u.data", U_DATA + "\n\n")  # trailing blank lines are fine
    # Act
    data = load_movielens_100k(path)
    # Assert
    assert len(data) == 3
    assert data.item_category is None


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (U_DATA + "1\t2\t3\n", 4, "has 3 fields, expected 4"),
        (U_DATA + "1\t2\t3\t4\t5\n", 4, "has 5 fields, expected 4"),
        ("1\t2\t3\t4\n1\tx9\t3\t4\n", 2, "item_id 'x9' is not an integer"),
        ("1\t2\t3\t4\n1\t2\t3\t4.5\n", 2, "timestamp '4.5' is not an integer"),
        ("1\t2\tbad\t4\n", 1, "rating 'bad' is not a number"),
        (
            "user\titem\trating\ttimestamp\n" + U_DATA,
            1,
            "user_id 'user' is not an integer",
        ),
        ("1\t2\t3\t4\n\n1\t2\t3\t4\n", 2, "is blank"),
    ],
)
def test_ml100k_malformed_line_names_file_and_line(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    # Arrange
    path = _write(tmp_path / "u.data", text)
    # Act
    with pytest.raises(DataError) as info:
        load_movielens_100k(tmp_path)
    # Assert
    assert f"{path}: line {line}" in str(info.value)
    assert fragment in str(info.value)


def test_ml100k_empty_file_raises(tmp_path: Path) -> None:
    # Arrange
    path = _write(tmp_path / "u.data", "\n")
    # Act / Assert
    with pytest.raises(DataError, match=re.escape(f"{path}: empty file")):
        load_movielens_100k(tmp_path)


def test_ml100k_bad_genre_flag_names_u_item_line(tmp_path: Path) -> None:
    # Arrange
    _write(tmp_path / "u.data", U_DATA)
    bad = _u_item_line(302).replace("|0|0", "|0|2", 1)
    path = _write(tmp_path / "u.item", f"{_u_item_line(242)}\n{bad}\n")
    # Act / Assert
    message = f"{path}: line 2: genre flag 'Action' is '2'"
    with pytest.raises(DataError, match=re.escape(message)):
        load_movielens_100k(tmp_path)


def test_ml100k_missing_directory_says_what_is_expected(tmp_path: Path) -> None:
    # Act / Assert
    with pytest.raises(DataError, match=re.escape(f"expected u.data in {tmp_path}")):
        load_movielens_100k(tmp_path)


def test_real_ml100k() -> None:
    # Arrange
    path = Path(os.environ.get("FEDREC_ML100K", REPO.parent / "shared/data/ml-100k"))
    if not (path / "u.data").is_file():
        message = (
            f"MovieLens-100K not found: expected u.data in {path}; set FEDREC_ML100K "
            "to the ml-100k directory, or FEDREC_ALLOW_MISSING_DATA=1 to skip"
        )
        if os.environ.get("FEDREC_ALLOW_MISSING_DATA") == "1":
            pytest.skip(message)
        pytest.fail(message)
    # Act
    data = load_movielens_100k(path)
    # Assert
    assert (len(data), data.num_users, data.num_items) == (100_000, 943, 1682)
    assert data.item_category is not None
    assert data.item_category.min() >= 0  # every movie in u.item has a genre flag


# MovieLens-1M


def test_ml1m_parses_ratings_and_first_genre(tmp_path: Path) -> None:
    # Arrange
    _write(tmp_path / "ratings.dat", "1::1193::5::978300760\n2::661::3::978302109\n")
    movies = (
        "1193::One Flew: Nest (1975)::Drama\n661::Peach (1996)::Animation|Musical\n"
    )
    _write(tmp_path / "movies.dat", movies, encoding="latin-1")
    # Act
    data = load_movielens_1m(tmp_path)
    # Assert
    assert data.user_ids.tolist() == ["1", "2"]
    assert data.item_ids.tolist() == ["1193", "661"]
    assert data.timestamp.tolist() == [978300760, 978302109]
    assert data.item_category is not None
    assert data.item_category.tolist() == [
        GENRES.index("Drama"),
        GENRES.index("Animation"),
    ]


@pytest.mark.parametrize(
    ("ratings", "movies", "file", "line", "fragment"),
    [
        ("1::2::3::4\n1::2::3\n", None, "ratings.dat", 2, "has 3 fields, expected 4"),
        ("1::2::3::4\nx::2::3::4\n", None, "ratings.dat", 2, "user_id 'x' is not"),
        ("1::2::3::4\n", "2::A (1990)::Drama\n3::B::Polka\n", "movies.dat", 2, "Polka"),
    ],
)
def test_ml1m_malformed_line_names_file_and_line(
    tmp_path: Path,
    ratings: str,
    movies: str | None,
    file: str,
    line: int,
    fragment: str,
) -> None:
    # Arrange
    _write(tmp_path / "ratings.dat", ratings)
    if movies is not None:
        _write(tmp_path / "movies.dat", movies)
    # Act
    with pytest.raises(DataError) as info:
        load_movielens_1m(tmp_path)
    # Assert
    assert f"{tmp_path / file}: line {line}" in str(info.value)
    assert fragment in str(info.value)


# CSV and Parquet


def test_csv_maps_columns_and_numbers_category_names(tmp_path: Path) -> None:
    # Arrange
    path = _write(tmp_path / "log.csv", CSV)
    # Act
    data = load_interactions_file(path, category_col="genre")
    # Assert
    assert data.user_ids.tolist() == ["alice", "bob"]
    assert data.item_ids.tolist() == ["i1", "i2"]
    assert data.item_idx.tolist() == [0, 1, 1]
    assert data.timestamp.tolist() == [100, 200, 300]
    assert data.item_category is not None
    assert data.item_category.tolist() == [1, 0]  # sorted names: jazz=0, rock=1
    assert data.source == str(path)


def test_txt_guesses_separator_and_parses_iso_datetimes(tmp_path: Path) -> None:
    # Arrange
    text = "u;i;when\n7;42;1970-01-01T00:01:40Z\n8;42;1970-01-01 00:03:20\n"
    path = _write(tmp_path / "log.txt", text)
    # Act
    data = load_interactions_file(
        path, user_col="u", item_col="i", timestamp_col="when"
    )
    # Assert
    assert data.user_ids.tolist() == ["7", "8"]
    assert data.timestamp.tolist() == [100, 200]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (CSV + "carol,i3\n", 5, "has 2 fields, expected 4"),
        (
            CSV + "user_id,item_id,timestamp,genre\n" + CSV.splitlines()[1],
            5,
            "repeats the header",
        ),
        (CSV.replace("bob,", ","), 3, "user_id is empty"),
        (CSV.replace("300", "soon"), 4, "timestamp 'soon' is neither a number"),
        (CSV.replace("300,jazz", "300,rock"), 4, "item 'i2' has category 'rock'"),
    ],
)
def test_csv_malformed_line_names_file_and_line(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    # Arrange
    path = _write(tmp_path / "log.csv", text)
    # Act
    with pytest.raises(DataError) as info:
        load_interactions_file(path, category_col="genre")
    # Assert
    assert f"{path}: line {line}" in str(info.value)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty file"),
        ("user_id,item_id,timestamp\n", "no data lines after the header"),
    ],
)
def test_csv_without_data_lines_raises(
    tmp_path: Path, text: str, fragment: str
) -> None:
    # Arrange
    path = _write(tmp_path / "log.csv", text)
    # Act / Assert
    with pytest.raises(DataError, match=f"{re.escape(str(path))}.*{fragment}"):
        load_interactions_file(path)


def test_missing_column_names_it_and_the_columns_found(tmp_path: Path) -> None:
    # Arrange
    path = _write(tmp_path / "log.csv", "user,item_id,timestamp\na,b,1\n")
    # Act
    with pytest.raises(DataError) as info:
        load_interactions_file(path)
    # Assert
    message = str(info.value)
    assert str(path) in message
    assert "['user_id']" in message
    assert "['user', 'item_id', 'timestamp']" in message


def test_missing_file_raises(tmp_path: Path) -> None:
    # Act / Assert
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        load_interactions_file(tmp_path / "nope.csv")


def test_parquet_round_trip(tmp_path: Path) -> None:
    # Arrange
    frame = pd.DataFrame(
        {
            "uid": ["a", "b", "a"],
            "iid": np.array([10, 20, 30], dtype=np.int64),
            "ts": pd.to_datetime([1, 2, 3], unit="s"),
            "cat": [4, 5, 4],
        }
    )
    path = tmp_path / "log.parquet"
    frame.to_parquet(path)
    # Act
    data = load_interactions_file(
        path, user_col="uid", item_col="iid", timestamp_col="ts", category_col="cat"
    )
    # Assert
    assert data.user_ids.tolist() == ["a", "b"]
    assert data.item_ids.tolist() == ["10", "20", "30"]
    assert data.timestamp.tolist() == [1, 2, 3]
    assert data.item_category is not None
    assert data.item_category.tolist() == [4, 5, 4]


def test_parquet_null_id_names_the_row(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "log.pq"
    pd.DataFrame(
        {"user_id": ["a", None], "item_id": ["x", "y"], "timestamp": [1, 2]}
    ).to_parquet(path)
    # Act / Assert
    message = f"{path}: row 2: user_id is missing"
    with pytest.raises(DataError, match=re.escape(message)):
        load_interactions_file(path)


# Dispatch


def test_load_dataset_dispatches_by_name(tmp_path: Path) -> None:
    # Arrange
    _write(tmp_path / "u.data", U_DATA)
    csv_path = _write(tmp_path / "log.csv", CSV)
    # Act
    movielens = load_dataset("ml-100k", tmp_path, user_col="ignored")
    table = load_dataset("csv", csv_path, category_col="genre")
    synthetic = load_dataset("synthetic", None, num_users=50, num_items=100)
    # Assert
    assert len(movielens) == 3
    assert table.num_users == 2
    assert synthetic.num_users == 50


@pytest.mark.parametrize(("name", "data_dir"), [("ml-10m", Path(".")), ("ml-1m", None)])
def test_load_dataset_rejects_bad_settings(name: str, data_dir: Path | None) -> None:
    # Act / Assert
    with pytest.raises(ConfigError, match=name):
        load_dataset(name, data_dir)
