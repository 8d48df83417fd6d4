"""hybrid-mf through fedrec's real ServerApp/ClientApps (in-process grid): text from an items file, plain and local DP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.supercore.task_identity import TaskIdentity

from common import content
from common.config import AppConfig
from common.models import HybridMF
from common.run_config import load_default_run_config
from common.storage import load_arrays
from simulations.inprocess import run_inprocess
from tests.text_fixtures import tiny_sentence_model

NUM_USERS, NUM_ITEMS = 60, 40


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hybrid")
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{i}", t) for u in range(NUM_USERS) for t, i in enumerate(rng.choice(NUM_ITEMS, 12, replace=False))]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(root / "log.csv", index=False)
    genres = ["action", "crime", "animation"]
    # item i39 has no row: its text is the empty string
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(NUM_ITEMS - 1)],
                          "title": [f"w{i % 12}" for i in range(NUM_ITEMS - 1)],
                          "genres": [genres[i % 3] for i in range(NUM_ITEMS - 1)]})
    items.to_csv(root / "items.csv", index=False)
    return {"root": root, "log": root / "log.csv", "items": root / "items.csv", "model": tiny_sentence_model(root)}


def _config(files: dict[str, Path], run_dir: Path, **extra) -> dict:
    return {
        **load_default_run_config(),
        "num-server-rounds": 2,
        "run-dir": str(run_dir),
        "data.dataset": "csv",
        "data.path": str(files["log"]),
        "data.eval-negatives": 20,
        "eval.k": 5,
        "eval.full-ranking-k": 5,
        "model.name": "hybrid-mf",
        "model.dim": 8,
        "items.path": str(files["items"]),
        "items.text-cols": "title,genres",
        "items.encoder": str(files["model"]),
        "items.cache-dir": str(files["root"] / "cache"),
        "items.device": "cpu",
        "strategy.reject-opposed": False,
        **extra,
    }


def test_model_for_aligns_texts_with_the_catalogue(files, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = AppConfig.from_run_config(_config(files, files["root"] / "unused"))
    model = content.model_for(cfg, 3, NUM_ITEMS)
    assert isinstance(model, HybridMF) and model.item_text.shape == (NUM_ITEMS, 8)
    # the same text gives the same row: i0 and i12 are both "w0" + "action"? (0 % 3 = 0, 12 % 3 = 0) -> equal
    from common.data.pipeline import load_interactions

    ids = [str(i) for i in load_interactions(cfg.data, cfg.seed).item_ids]
    t = model.item_text.numpy()
    np.testing.assert_allclose(t[ids.index("i0")], t[ids.index("i12")], rtol=1e-5)
    assert not np.allclose(t[ids.index("i0")], t[ids.index("i1")])
    # canary-style extra items beyond the catalogue get zero rows
    bigger = content.catalogue_text_embeddings(cfg, NUM_ITEMS + 2)
    assert bigger.shape == (NUM_ITEMS + 2, 8) and float(bigger[-2:].abs().sum()) == 0.0


@pytest.mark.parametrize("private", [False, True])
def test_federated_hybrid_trains_the_shared_projection(files, tmp_path, monkeypatch, private: bool) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    extra = {"privacy.mode": "local", "privacy.local.noise-multiplier": 1.0, "privacy.local.target-epsilon": 0.0,
             "privacy.local.batch-size": 8} if private else {}
    run_inprocess(_config(files, tmp_path / "run", **extra), num_nodes=3)
    initial = load_arrays(tmp_path / "run" / "initial.npz")
    final = load_arrays(tmp_path / "run" / "final.npz")
    assert set(final.keys()) == {"item_embedding.weight", "item_bias.weight", "global_bias.value", "item_text_projection.weight"}
    w0, w1 = initial["item_text_projection.weight"].numpy(), final["item_text_projection.weight"].numpy()
    assert w1.shape == (8, 8) and not np.allclose(w0, w1), "the projection is trained and aggregated"
    assert float(np.abs(initial["item_embedding.weight"].numpy()).sum()) == 0.0, "hybrid free rows start at 0"
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2
