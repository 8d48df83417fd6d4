"""Distributed DP's ``top-items``: only the items with the largest released DP counts train."""

import numpy as np
import pytest

from client.app import app as client_app
from client.distributed import clipped_delta_sum
from common import records
from common.errors import ConfigError
from common.privacy import distributed as dd
from server.distributed import with_item_rows_zeroed
from server.federation import run_federation
from tests.fakes import LocalGrid
from tests.server.test_distributed_anchor import SUM, model, settings, step, strategy
from tests.server.test_distributed_round import SILOS, _cfg, _toy, distributed_config


def test_the_mask_takes_the_largest_counts_ties_to_the_lower_index():
    counts = np.array([3.0, 5.0, -1.0, 5.0, 0.5])
    assert dd.top_item_mask(counts, 2).tolist() == [False, True, False, True, False]
    assert dd.top_item_mask(counts, 3).tolist() == [True, True, False, True, False]
    assert dd.top_item_mask(np.array([1.0, 1.0, 1.0]), 1).tolist() == [True, False, False]
    assert dd.top_item_mask(counts, 0).all() and dd.top_item_mask(counts, 5).all() and dd.top_item_mask(counts, 9).all()
    with pytest.raises(dd.DistributedDPError, match="non-finite"):
        dd.top_item_mask(np.array([1.0, np.nan]), 1)


def _parts(flat, num_items, dim):
    """Split a flattened delta (global bias, item biases, item embeddings) into its three parts."""
    return flat[0], flat[1 : 1 + num_items], flat[1 + num_items :].reshape(num_items, dim)


def test_a_users_delta_keeps_only_the_trainable_items_rows_before_clipping():
    split, mf = _toy(num_users=4, num_items=6)
    cfg = _cfg(**{"privacy.distributed.lr": 0.5})
    trainable = np.array([True, False, True, False, True, False])
    full, _ = clipped_delta_sum(mf, split, cfg, np.array([0, 2]), 1e6, 0, 1)
    kept, _ = clipped_delta_sum(mf, split, cfg, np.array([0, 2]), 1e6, 0, 1, trainable)
    g_full, b_full, e_full = _parts(full, 6, 3)
    g_kept, b_kept, e_kept = _parts(kept, 6, 3)
    assert g_kept == pytest.approx(g_full)  # the global bias is not an item row
    np.testing.assert_allclose(b_kept, np.where(trainable, b_full, 0.0), atol=1e-12)
    np.testing.assert_allclose(e_kept, np.where(trainable[:, None], e_full, 0.0), atol=1e-12)
    assert np.abs(e_full[~trainable]).sum() > 0  # the dropped rows were not zero to begin with
    # clipped: the whole bound goes to what is kept (one user: norm C, direction of the kept part)
    one, clipped = clipped_delta_sum(mf, split, cfg, np.array([2]), 0.01, 0, 1, trainable)
    unclipped, _ = clipped_delta_sum(mf, split, cfg, np.array([2]), 1e6, 0, 1, trainable)
    assert clipped == 1
    assert np.linalg.norm(one) == pytest.approx(0.01, rel=1e-6)
    np.testing.assert_allclose(one, unclipped * 0.01 / np.linalg.norm(unclipped), rtol=1e-6, atol=1e-15)


def test_the_server_discards_the_other_items_coordinates_of_the_sum():
    s = strategy(settings(**{"privacy.distributed.top-items": 2}), [SUM])
    s.trainable = dd.top_item_mask(s.popularity, 2)  # HISTOGRAM [3, -1, 0.5]: items 0 and 2
    out = step(s, 1, model())
    mean = SUM / 10.0
    w = np.array([1.0, 0.0, 1.0])
    assert out["global_bias.value"] == pytest.approx([0.7 + 0.5 * mean[0]])
    assert out["item_bias.weight"].ravel() == pytest.approx(np.array([0.1, 0.2, 0.3]) + 0.5 * w * mean[1:4])
    want = np.arange(1.0, 7.0).reshape(3, 2) + 0.5 * w[:, None] * mean[4:].reshape(3, 2)
    assert out["item_embedding.weight"] == pytest.approx(want, rel=1e-6)
    zeroed = with_item_rows_zeroed(model(), np.array([False, True, False]))["item_embedding.weight"].numpy()
    assert zeroed.tolist() == [[1.0, 2.0], [0.0, 0.0], [5.0, 6.0]]


def test_top_items_without_the_histogram_is_refused():
    with pytest.raises(ConfigError, match="top-items.*popularity = true"):
        settings(**{"privacy.distributed.top-items": 5, "privacy.distributed.popularity": False})


def test_a_run_trains_only_the_top_items_rows_and_the_silos_get_the_histogram(tmp_path):
    run_dir = tmp_path / "run"
    sent: list[dict] = []

    def spy(node, message):  # never drops: records what the server sends for training
        config = message.content.config_records.get(records.CONFIG)
        if message.metadata.message_type == "train" and config is not None and config.get(dd.PHASE) == "train":
            sent.append(dict(config))
        return False

    top = 40
    cfg = distributed_config(run_dir, **{"privacy.distributed.top-items": top})
    run_federation(LocalGrid(client_app, cfg, SILOS, drop=spy), cfg)
    histograms = [np.array(c[dd.RELEASED_POPULARITY]) for c in sent]
    assert len(histograms) == 2 * SILOS and all(np.array_equal(h, histograms[0]) for h in histograms)
    mask = dd.top_item_mask(histograms[0], top)
    emb = np.load(run_dir / "final.npz")["item_embedding.weight"]
    assert not emb[~mask].any()  # zeroed after the histogram and never stepped
    assert (np.abs(emb[mask]).sum(axis=1) > 0).all()  # every top item's row moved
