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
