"""hybrid-mf: MF plus a shared projection of fixed text embeddings; shapes, sharing, DP coverage, item-init."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from common.config import AppConfig
from common.content import apply_item_init, load_item_init
from common.errors import ConfigError
from common.models import HybridMF, build_model, lookup_rows, private_state, shared_state
from common.privacy.dpsgd import SparseDPSGD
from common.run_config import load_default_run_config

NUM_USERS, NUM_ITEMS, DIM, TEXT_DIM = 10, 20, 6, 5


def _model(seed: int = 0) -> HybridMF:
    torch.manual_seed(seed)
    text = torch.randn(NUM_ITEMS, TEXT_DIM, generator=torch.Generator().manual_seed(7))
    model = build_model("hybrid-mf", NUM_USERS, NUM_ITEMS, DIM, item_text=text)
    assert isinstance(model, HybridMF)
    with torch.no_grad():  # trained-looking free rows, so every term of q_i = e_i + W t_i matters
        model.item_embedding.weight.normal_(0, 0.1)
        model.item_text_projection.weight.normal_(0, 0.3)
    return model


def test_forward_shapes_and_score_all_agree() -> None:
    model = _model()
    users = torch.tensor([0, 3, 9])
    items = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 19, 10]])
    logits = model(users, items)
    assert logits.shape == (3, 4)
    rows = lookup_rows(model, users, items)
    assert rows["item_text"].shape == (3, 4, TEXT_DIM)
    full = model.score_all(users)
    assert full.shape == (3, NUM_ITEMS)
    torch.testing.assert_close(full.gather(1, items), logits)


def test_an_item_without_interactions_is_scored_by_its_text() -> None:
    """A fresh model has e_i = 0 and b_i = 0: s(u, i) = <p_u, W t_i> + b_u + b."""
    torch.manual_seed(0)
    text = torch.randn(NUM_ITEMS, TEXT_DIM)
    model = build_model("hybrid-mf", NUM_USERS, NUM_ITEMS, DIM, item_text=text)
    assert torch.count_nonzero(model.item_embedding.weight) == 0
    u = torch.tensor([2])
    expected = model.user_embedding.weight[2] @ (model.item_text_projection.weight @ text[4])
    expected = expected + model.user_bias.weight[2, 0] + model.global_bias.value[0]
    torch.testing.assert_close(model(u, torch.tensor([[4]]))[0, 0], expected)


def test_projection_is_shared_and_text_never_in_state() -> None:
    model = _model()
    shared = shared_state(model)
    assert "item_text_projection.weight" in shared
    assert shared["item_text_projection.weight"].shape == (DIM, TEXT_DIM)
    assert not any("item_text." in k or k == "item_text" for k in model.state_dict())
    assert set(private_state(model)) == {"user_embedding.weight", "user_bias.weight"}


def test_bad_text_shape_and_missing_text_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"item_text must have shape \(20, D\)"):
        build_model("hybrid-mf", NUM_USERS, NUM_ITEMS, DIM, item_text=torch.zeros(NUM_ITEMS - 1, 3))
    with pytest.raises(ValueError, match="needs the items' text embeddings"):
        build_model("hybrid-mf", NUM_USERS, NUM_ITEMS, DIM)


def _loss(model):
    def per_sample(rows):
        logits = model.score_rows(rows)
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(1)

    return per_sample


def _per_sample_grads(model, users, items, released):
    out = []
    for b in range(len(users)):
        model.zero_grad(set_to_none=True)
        _loss(model)(lookup_rows(model, users[b : b + 1], items[b : b + 1])).sum().backward()
        out.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters() if n in released})
    return out


def test_dp_step_clips_and_updates_the_projection_per_sample() -> None:
    """The projection W is a released parameter: its per-sample gradient counts in each norm and is clipped."""
    model = _model()
    g = torch.Generator().manual_seed(3)
    users = torch.randperm(NUM_USERS, generator=g)[:5]
    items = torch.randint(0, NUM_ITEMS, (5, 6), generator=g)
    released = [n for n, _ in model.named_parameters() if not n.startswith("user_")]
    assert "item_text_projection.weight" in released
    brute = _per_sample_grads(copy.deepcopy(model), users, items, released)
    norms = torch.stack([torch.sqrt(sum(x.pow(2).sum() for x in s.values())) for s in brute])
    without_w = torch.stack([torch.sqrt(sum(x.pow(2).sum() for n, x in s.items() if "projection" not in n)) for s in brute])
    assert all(float(s["item_text_projection.weight"].norm()) > 0.1 for s in brute), "W must carry gradient here"
    assert (norms > without_w).all()

    clip, lr, bbar = 0.05, 0.2, 4.0
    before = copy.deepcopy(model.state_dict())
    engine = SparseDPSGD(model, noise_multiplier=0.0, clip=clip, lr=lr, expected_batch_size=bbar, private_tables=model.user_tables)
    engine.step(users, items, _loss(model))
    torch.testing.assert_close(engine.last_norms, norms, rtol=1e-5, atol=1e-7)
    assert (norms > clip).all()
    w = "item_text_projection.weight"
    expected = before[w] - lr / bbar * sum(s[w] * min(1.0, clip / float(n)) for s, n in zip(brute, norms, strict=True))
    torch.testing.assert_close(model.state_dict()[w], expected, rtol=1e-5, atol=1e-7)


def test_dp_noise_reaches_the_projection() -> None:
    model = _model()
    start = model.item_text_projection.weight.detach().clone()
    engine = SparseDPSGD(model, noise_multiplier=1.0, clip=1.0, lr=1.0, expected_batch_size=1.0,
                         private_tables=model.user_tables, generator=torch.Generator().manual_seed(0))
    engine.step(torch.zeros(0, dtype=torch.long), torch.zeros((0, 2), dtype=torch.long), lambda rows: torch.zeros(0))
    moved = model.item_text_projection.weight.detach() - start
    # noise-only step: W moves by lr / B̄ · N(0, (σC)²) per entry
    assert moved.abs().min() > 0
    assert 0.5 < float(moved.std()) < 1.6


def test_config_requires_item_texts_for_hybrid() -> None:
    base = load_default_run_config()
    with pytest.raises(ConfigError, match="model.name: hybrid-mf needs item texts.*items.path"):
        AppConfig.from_run_config({**base, "model.name": "hybrid-mf"})  # synthetic: no item file
    with pytest.raises(ConfigError, match="items.text-cols"):
        AppConfig.from_run_config({**base, "items.path": "x.csv", "items.text-cols": " , "})
    ml = {**base, "model.name": "hybrid-mf", "data.dataset": "ml-100k", "data.path": "d"}
    with pytest.raises(ConfigError, match="audit.canaries: canary items have no text"):
        AppConfig.from_run_config({**ml, "privacy.mode": "local", "audit.canaries": 4, "strategy.aggregator": "fedavg"})
    cfg = AppConfig.from_run_config(ml)
    assert cfg.items.text_cols == ("title",) and cfg.items.device == "auto"


def test_item_init_loads_a_checked_table(tmp_path) -> None:
    table = np.arange(NUM_ITEMS * DIM, dtype=np.float32).reshape(NUM_ITEMS, DIM)
    np.save(tmp_path / "items.npy", table)
    cfg = AppConfig.from_run_config({**load_default_run_config(), "model.item-init": str(tmp_path / "items.npy"), "model.dim": DIM})
    model = build_model("mf", NUM_USERS, NUM_ITEMS, DIM)
    apply_item_init(cfg, model)
    np.testing.assert_array_equal(model.item_embedding.weight.detach().numpy(), table)
    with pytest.raises(ConfigError, match=r"model.item-init: .*items.npy has shape \(20, 6\), the model's item table is \(21, 6\)"):
        load_item_init(str(tmp_path / "items.npy"), NUM_ITEMS + 1, DIM)
    np.save(tmp_path / "bad.npy", np.full((NUM_ITEMS, DIM), math.nan))
    with pytest.raises(ConfigError, match="values must be finite"):
        load_item_init(str(tmp_path / "bad.npy"), NUM_ITEMS, DIM)
    with pytest.raises(ConfigError, match=r"expected a \.npy file"):
        load_item_init(str(tmp_path / "items.csv"), NUM_ITEMS, DIM)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_item_init(str(tmp_path / "missing.npy"), NUM_ITEMS, DIM)
