"""``model.item-init = "content"``: the item table from the principal components of the item texts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from common import content
from common.config import AppConfig
from common.data.pipeline import load_interactions
from common.errors import ConfigError, DataError
from common.models import build_model
from common.run_config import load_default_run_config
from tests.text_fixtures import tiny_sentence_model


def test_the_table_is_the_top_principal_components_scaled_to_the_std():
    # centred already; principal axes: e2 (singular value 2√2), then e1 (√2); rank 2
    x = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, -2.0, 0.0]])
    one = content.content_item_table(x + 5.0, 1, 0.5).numpy()  # the mean is removed first
    coords = np.array([0.0, 0.0, 2.0, -2.0])  # scores on e2, std √(8/3)
    np.testing.assert_allclose(np.abs(one[:, 0]), np.abs(coords) * 0.5 / math.sqrt(8.0 / 3.0), rtol=1e-6)
    three = content.content_item_table(x, 3, 0.1).numpy()
    assert not three[:, 2].any()  # beyond the rank: zeros
    np.testing.assert_allclose(np.abs(three[:, 1]), np.array([1.0, 1.0, 0.0, 0.0]) * abs(three[2, 0]) / 2.0, rtol=1e-6)
    assert float(three.std(ddof=1)) == pytest.approx(0.1, rel=1e-6)
    with pytest.raises(DataError, match="all equal"):
        content.content_item_table(torch.ones(3, 4), 2, 0.1)


def test_genre_and_year_blocks_by_hand():
    genres = content.genre_block([["Drama", "Action"], [], ["Drama"]])  # columns: Action, Drama
    np.testing.assert_array_equal(genres, [[1, 1], [0, 0], [0, 1]])
    # newest release 1998: ages 0, 2, 4, 40 and the unknown year gets the median 1995 (age 3)
    block = content.year_block(np.array([1998.0, 1996.0, 1994.0, 1958.0, np.nan]))
    np.testing.assert_allclose(block[:, 0], [0.0, -0.2, -0.4, -4.0, -0.3])
    assert block[:, 1:].argmax(1).tolist() == [0, 1, 2, 7, 2] and (block[:, 1:].sum(1) == 1).all()
    assert content.year_block(np.array([1900.0, 1998.0]))[0, 0] == -content.MAX_AGE / 10.0
    with pytest.raises(DataError, match="no item of the catalogue has a release year"):
        content.year_block(np.array([np.nan, np.nan]))


def test_a_weighted_block_joins_the_embeddings_before_the_components():
    # text varies on items 0, 1 only (columns' mean std 1/(2√2)); the block on items 2, 3 only
    # (std 1/√2). Scaled, the text axis has ±2√2 and the block ±w·√2: the block's axis comes
    # first once w > 2, and weight 0 leaves it out.
    text = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    block = np.array([[0.0], [0.0], [1.0], [-1.0]])
    plain = content.content_item_table(text, 1, 0.5).numpy()[:, 0]
    np.testing.assert_allclose(content.content_item_table(text, 1, 0.5, [(block, 0.0)]).numpy()[:, 0], plain)
    text_first = content.content_item_table(text, 1, 0.5, [(block, 1.0)]).numpy()[:, 0]
    block_first = content.content_item_table(text, 1, 0.5, [(block, 3.0)]).numpy()[:, 0]
    assert np.abs(text_first[:2]).min() > 0 and not text_first[2:].any()
    assert np.abs(block_first[2:]).min() > 0 and not block_first[:2].any()
    two = content.content_item_table(text, 2, 0.5, [(block, 3.0)]).numpy()  # both axes, block first: ratio w√2 / 2√2
    assert abs(two[2, 0]) / abs(two[0, 1]) == pytest.approx(1.5, rel=1e-6)
    with pytest.raises(DataError, match="same for every item"):
        content.content_item_table(text, 1, 0.5, [(np.ones((4, 1)), 1.0)])
    with pytest.raises(DataError, match="a content block has 3 rows, the catalogue 4"):
        content.content_item_table(text, 1, 0.5, [(np.ones((3, 1)), 1.0)])


def test_metadata_weights_need_the_content_table_of_a_movielens_catalogue(tmp_path):
    ml = {**load_default_run_config(), "data.dataset": "ml-100k", "data.path": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"model.item-init-genre-weight.*item-init = \"content\" \(is ''\).*ml-100k"):
        AppConfig.from_run_config({**ml, "model.item-init-year-weight": 1.0})
    with pytest.raises(ConfigError, match=r"data.dataset ml-100k or ml-1m \(is 'csv'\)"):
        AppConfig.from_run_config({**ml, "data.dataset": "csv", "items.path": str(tmp_path / "items.csv"),
                                   "model.item-init": "content", "model.item-init-genre-weight": 1.0})  # fmt: skip
    with pytest.raises(ConfigError, match=r"model.item-init-year-weight: .*>= 0"):
        AppConfig.from_run_config({**load_default_run_config(), "model.item-init-year-weight": -1.0})


def test_content_init_needs_item_texts():
    with pytest.raises(ConfigError, match="model.item-init: content needs item texts.*items.path"):
        AppConfig.from_run_config({**load_default_run_config(), "model.item-init": "content"})  # synthetic


def test_the_server_starts_the_item_table_from_the_catalogues_texts(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{i}", t) for u in range(30) for t, i in enumerate(rng.choice(20, 8, replace=False))]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(tmp_path / "log.csv", index=False)
    genres = ["action", "crime", "animation", "drama"]
    pd.DataFrame({"item_id": [f"i{i}" for i in range(20)], "title": [f"w{i % 4}" for i in range(20)],
                  "genres": [genres[i % 4] for i in range(20)]}).to_csv(tmp_path / "items.csv", index=False)  # fmt: skip
    cfg = AppConfig.from_run_config({
        **load_default_run_config(), "data.dataset": "csv", "data.path": str(tmp_path / "log.csv"),
        "data.eval-negatives": 5, "eval.k": 3, "eval.full-ranking-k": 3, "model.dim": 4, "model.item-init": "content", "model.item-init-std": 0.3,
        "items.path": str(tmp_path / "items.csv"), "items.text-cols": "title,genres",
        "items.encoder": str(tiny_sentence_model(tmp_path)), "items.cache-dir": str(tmp_path / "cache"),
        "items.device": "cpu",
    })  # fmt: skip
    model = build_model("mf", 3, 20, 4)
    content.apply_item_init(cfg, model)
    got = model.item_embedding.weight.detach()
    want = content.content_item_table(content.catalogue_text_embeddings(cfg, 20), 4, 0.3)
    torch.testing.assert_close(got, want)
    assert float(got.std()) == pytest.approx(0.3, rel=1e-5)
    # items with the same text ("w0, action": i0, i4, ...) share a row; the others differ
    row = {str(item): k for k, item in enumerate(load_interactions(cfg.data, cfg.seed).item_ids)}
    assert torch.allclose(got[row["i0"]], got[row["i4"]]) and torch.allclose(got[row["i1"]], got[row["i17"]])
    assert not torch.allclose(got[row["i0"]], got[row["i1"]])


def test_metadata_blocks_follow_the_catalogue_index(tmp_path):
    none, drama, action = (["0"] * 19 for _ in range(3))
    drama[8], action[1] = "1", "1"
    (tmp_path / "u.item").write_text(  # listed 10, 20, 30; the log meets them as 30, 10, 20
        f"10|A (1990)|01-Jan-1990||x|{'|'.join(drama)}\n20|B (1998)|01-Jan-1998||x|{'|'.join(action)}\n"
        f"30|C|||x|{'|'.join(none)}\n"
    )
    rows = [(u, item, t) for u in range(1, 5) for t, item in enumerate((30, 10, 20))]
    (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t5\t{100 * u + t}\n" for u, i, t in rows))
    cfg = AppConfig.from_run_config({
        **load_default_run_config(), "data.dataset": "ml-100k", "data.path": str(tmp_path), "model.item-init": "content",
        "model.item-init-genre-weight": 1.0, "model.item-init-year-weight": 2.0,
    })  # fmt: skip
    ids = [str(i) for i in load_interactions(cfg.data, cfg.seed).item_ids]
    (genres, wg), (years, wy) = content.metadata_blocks(cfg, len(ids) + 1)  # one item beyond: a canary
    assert (wg, wy) == (1.0, 2.0) and genres.shape == (4, 2) and years.shape == (4, 9)
    want_genres = {"10": [0, 1], "20": [1, 0], "30": [0, 0]}  # columns: Action, Drama
    want_age = {"10": -0.8, "20": 0.0, "30": -0.4}  # unknown year: the median 1994
    for k, item in enumerate(ids):
        assert genres[k].tolist() == want_genres[item] and years[k, 0] == pytest.approx(want_age[item])
    assert not genres[3].any() and years[3, 0] == pytest.approx(-0.4)
    cfg_off = AppConfig.from_run_config({**load_default_run_config(), "data.dataset": "ml-100k", "data.path": str(tmp_path)})
    assert content.metadata_blocks(cfg_off, 3) == []
    (tmp_path / "u.item").write_text(  # no release years: the genre block alone is fine
        f"10|A|||x|{'|'.join(drama)}\n20|B|||x|{'|'.join(action)}\n30|C|||x|{'|'.join(none)}\n"
    )
    cfg_genres = AppConfig.from_run_config({**load_default_run_config(), "data.dataset": "ml-100k", "data.path": str(tmp_path),
                                            "model.item-init": "content", "model.item-init-genre-weight": 1.0})  # fmt: skip
    [(only, weight)] = content.metadata_blocks(cfg_genres, 3)
    assert weight == 1.0 and only.shape == (3, 2)
