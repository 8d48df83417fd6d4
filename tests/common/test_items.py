"""Item content sources: items files (CSV/TSV/Parquet), MovieLens u.item / movies.dat, catalogue alignment."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from common.data.items import catalogue_texts, read_items_file, read_movielens_catalogue, read_movielens_items
from common.errors import ConfigError, DataError


def test_csv_items_join_the_named_columns(tmp_path) -> None:
    f = tmp_path / "items.csv"
    f.write_text('item_id,title,genres,year\n10,Heat,Action|Crime,1995\n11,"Toy Story, The",,1995\n')
    texts = read_items_file(f, "item_id", ("title", "genres"))
    assert texts == {"10": "title: Heat. genres: Action|Crime", "11": "title: Toy Story, The"}


def test_tsv_and_parquet_items(tmp_path) -> None:
    (tmp_path / "i.tsv").write_text("id\tname\na\tAlpha\n")
    assert read_items_file(tmp_path / "i.tsv", "id", ("name",)) == {"a": "name: Alpha"}
    pd.DataFrame({"id": [1, 2], "name": ["One", None]}).to_parquet(tmp_path / "i.parquet")
    assert read_items_file(tmp_path / "i.parquet", "id", ("name",)) == {"1": "name: One", "2": ""}


def test_items_file_errors_name_file_key_and_line(tmp_path) -> None:
    with pytest.raises(DataError, match=r"items.path: .*nope.csv: not found"):
        read_items_file(tmp_path / "nope.csv", "item_id", ("title",))
    f = tmp_path / "items.csv"
    f.write_text("item_id,title\n1,A\n")
    with pytest.raises(DataError, match=r"items.text-cols: .*items.csv has no column 'plot'; its columns are \['item_id', 'title'\]"):
        read_items_file(f, "item_id", ("title", "plot"))
    with pytest.raises(DataError, match=r"items.id-col: .*has no column 'movie'"):
        read_items_file(f, "movie", ("title",))
    f.write_text("item_id,title\n1,A\n2,B\n1,C\n")
    with pytest.raises(DataError, match=r"items.csv: line 4: item '1' is listed twice"):
        read_items_file(f, "item_id", ("title",))
    f.write_text("item_id,title\n1,A\n,B\n")
    with pytest.raises(DataError, match=r"items.csv: line 3: empty 'item_id'"):
        read_items_file(f, "item_id", ("title",))
    (tmp_path / "items.json").write_text("{}")
    with pytest.raises(DataError, match=r"unknown suffix '.json'"):
        read_items_file(tmp_path / "items.json", "item_id", ("title",))


def _u_item(flags: list[str]) -> str:
    return f"1|Toy Story (1995)|01-Jan-1995||http://x|{'|'.join(flags)}\n"


def test_ml100k_u_item_titles_and_genre_flags(tmp_path) -> None:
    flags = ["0"] * 19
    flags[3] = flags[4] = flags[5] = "1"  # Animation, Children's, Comedy
    none = ["0"] * 19
    (tmp_path / "u.item").write_bytes((_u_item(flags) + _u_item(none).replace("1|Toy", "2|Caf\xe9 Toy")).encode("latin-1"))
    texts = read_movielens_items("ml-100k", tmp_path)
    assert texts == {"1": "Toy Story (1995). Genres: Animation, Children's, Comedy", "2": "Caf\xe9 Toy Story (1995)"}
    flags[0] = "2"
    (tmp_path / "u.item").write_text(_u_item(flags))
    with pytest.raises(DataError, match=r"u.item: line 1: genre flag 'unknown' is '2', expected 0 or 1"):
        read_movielens_items("ml-100k", tmp_path)


def test_ml1m_movies_dat_and_missing_file(tmp_path) -> None:
    (tmp_path / "movies.dat").write_bytes("1::Toy Story (1995)::Animation|Children's\n2::Se\xf1or (2000)::Drama\n".encode("latin-1"))
    texts = read_movielens_items("ml-1m", tmp_path / "ratings.dat")
    assert texts == {"1": "Toy Story (1995). Genres: Animation, Children's", "2": "Se\xf1or (2000). Genres: Drama"}
    with pytest.raises(DataError, match=r"u.item: not found"):
        read_movielens_items("ml-100k", tmp_path)
    with pytest.raises(ConfigError, match=r"data.dataset 'csv' has no built-in item file"):
        read_movielens_items("csv", tmp_path)


def test_release_years_from_the_date_else_the_title(tmp_path) -> None:
    none = "|".join(["0"] * 19)
    (tmp_path / "u.item").write_text(
        f"1|Toy Story (1995)|01-Jan-1996||http://x|{none}\n"  # the date wins over the title
        f"2|Heat (1995)|||http://x|{none}\n"  # no date: the title's year
        f"3|unknown|||http://x|{none}\n"  # neither
    )
    years = read_movielens_catalogue("ml-100k", tmp_path).years
    assert years[:2].tolist() == [1996.0, 1995.0] and math.isnan(years[2])
    (tmp_path / "movies.dat").write_text("7::Se7en (1995)::Crime|Thriller\n8::No year::Drama\n")
    cat = read_movielens_catalogue("ml-1m", tmp_path)
    assert cat.item_ids.tolist() == [7, 8] and cat.genres == [["Crime", "Thriller"], ["Drama"]]
    assert cat.years[0] == 1995.0 and np.isnan(cat.years[1])


def test_catalogue_texts_follow_the_item_index() -> None:
    texts, missing = catalogue_texts(["b", "x", "a"], {"a": "A", "b": "B"})
    assert texts == ["B", "", "A"] and missing == 1
