"""A hybrid-mf model is served as MF over its item vectors e_i + W t_i."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.models import HybridMF, shared_state
from serving import scoring


def test_materialised_hybrid_scores_equal_the_models_own_scores():
    torch.manual_seed(0)
    text = torch.randn(7, 5)
    model = HybridMF(4, 7, 3, text)
    with torch.no_grad():
        model.item_embedding.weight.normal_()  # trained free rows (zero at the start)
    shared = {k: v.numpy() for k, v in shared_state(model).items()}
    assert scoring.HYBRID_PROJECTION in shared and "item_text" not in shared
    served = scoring.materialise_hybrid(shared, text.numpy())
    assert scoring.HYBRID_PROJECTION not in served and scoring.model_kind(served, "test") == "mf"
    users = {"user_embedding.weight": model.user_embedding.weight.detach().numpy(),
             "user_bias.weight": model.user_bias.weight.detach().numpy()}
    got = scoring.score("mf", served, users, np.arange(4))
    want = model.score_all(torch.arange(4)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_hand_computed_item_vector_and_shape_errors():
    shared = {"item_embedding.weight": np.array([[1.0, 0.0]], np.float32),
              scoring.HYBRID_PROJECTION: np.array([[2.0], [3.0]], np.float32),
              "item_bias.weight": np.zeros((1, 1), np.float32), "global_bias.value": np.zeros(1, np.float32)}
    out = scoring.materialise_hybrid(shared, np.array([[0.5]], np.float32))
    np.testing.assert_array_equal(out["item_embedding.weight"], [[2.0, 1.5]])  # e + W t = (1+1, 0+1.5)
    with pytest.raises(scoring.ModelError, match=r"text embeddings have shape \(1, 2\), the model needs \(1, 1\)"):
        scoring.materialise_hybrid(shared, np.zeros((1, 2), np.float32))
    with pytest.raises(scoring.ModelError, match="serve it from its run directory"):
        scoring.model_kind(shared, "bundle")
