"""Fold-in fits a new user's rows on the training loss against the frozen shared model."""

import numpy as np
import torch

from common.models import MF, NeuMF, shared_state
from common.training import interaction_loss
from serving import scoring
from serving.foldin import fold_in, mf_gradient

TRAIN = {"loss": "bce", "l2": 0.01, "num-negatives": 4}


def test_the_numpy_mf_gradient_is_autograds_gradient_of_the_training_loss():
    torch.manual_seed(0)
    model = MF(1, 30, 4).double()
    shared = {k: v.numpy() for k, v in shared_state(model).items()}
    items = np.array([[3, 7, 8, 9, 10], [5, 1, 2, 9, 11]])
    labels = np.zeros(items.shape)
    labels[:, 0] = 1
    theta = np.array([0.3, -0.2, 0.1, 0.5, 0.05])
    with torch.no_grad():
        model.user_embedding.weight[0] = torch.tensor(theta[:4])
        model.user_bias.weight[0] = theta[4]
    users, batch = torch.zeros(2, dtype=torch.long), torch.from_numpy(items)
    loss = (interaction_loss(model(users, batch), "bce") + 0.01 * model.l2_terms(users, batch)).mean()
    loss.backward()
    expected = np.r_[model.user_embedding.weight.grad[0].numpy(), model.user_bias.weight.grad[0].numpy()]
    bi = shared["item_bias.weight"][:, 0] + shared["global_bias.value"][0]
    got = mf_gradient(theta, shared["item_embedding.weight"], bi, items, labels, 0.01)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def _planted(kind):
    """A shared model whose items 0..9 score high for users along one direction."""
    torch.manual_seed(1)
    model = MF(1, 100, 8) if kind == "mf" else NeuMF(1, 100, 8, (16, 8))
    table = model.item_embedding if kind == "mf" else model.item_gmf
    with torch.no_grad():
        table.weight[:10] += 2.0 * torch.ones(8) / 8**0.5
    return {k: v.numpy() for k, v in shared_state(model).items()}


def test_fold_in_of_a_history_inside_a_planted_cluster_ranks_the_rest_of_the_cluster_first():
    for kind in ("mf", "neumf"):
        shared = _planted(kind)
        rows = fold_in(kind, shared, [np.arange(5)], TRAIN, steps=150)
        scores = scoring.score(kind, shared, rows, np.array([0]))[0]
        top = scoring.top_k(scores, 5, exclude=np.arange(5))
        assert set(top.tolist()) <= set(range(5, 10)), (kind, top)
        assert set(rows) == set(scoring.private_names(kind))
