"""The DP step's fast paths (closed-form MF gradients, reused buffers) and its dense-layer guard."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from common.models import MF, HybridMF, RowDot, build_model, closed_form_row_gradients, lookup_rows, row_dot
from common.privacy import dpsgd
from tests.common import dpsgd_reference
from tests.fakes import bce_l2_loss as _loss

NUM_USERS, NUM_ITEMS, DIM, TEXT_DIM = 12, 30, 8, 6


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    text = torch.randn(NUM_ITEMS, TEXT_DIM, generator=torch.Generator().manual_seed(5))
    return build_model(name, NUM_USERS, NUM_ITEMS, DIM, (16, 8), item_text=text if name == "hybrid-mf" else None)


def _batch(seed: int, batch: int = 6, reads: int = 7):
    g = torch.Generator().manual_seed(seed)
    users = torch.randperm(NUM_USERS, generator=g)[:batch]
    items = torch.randint(0, NUM_ITEMS, (batch, reads), generator=g)
    if batch and reads > 3:
        items[:, 3] = items[:, 0]  # duplicate reads inside a sample
    return users, items



def _engine(module, model, **overrides):
    settings = {
        "noise_multiplier": 0.8, "clip": 0.05, "lr": 0.3, "expected_batch_size": 5.0,
        "private_tables": model.user_tables, "private_lr": 0.2, "generator": torch.Generator().manual_seed(7),
    }
    return module.SparseDPSGD(model, **{**settings, **overrides})


# ----------------------------------------------------------------- RowDot
@pytest.mark.parametrize("reads", [1, 5, 20])  # read-by-read sum (≤ 8 reads) and one (B, T, D) product
def test_row_dot_gradients_are_the_einsum_gradients(reads: int) -> None:
    # Arrange
    g = torch.Generator().manual_seed(reads)
    p = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    q = torch.randn(4, reads, 3, dtype=torch.float64, generator=g, requires_grad=True)
    upstream = torch.randn(4, reads, dtype=torch.float64, generator=g)
    # Act
    closed = torch.autograd.grad(RowDot.apply(p, q), [p, q], upstream)
    reference = torch.autograd.grad(torch.einsum("bd,btd->bt", p, q), [p, q], upstream)
    # Assert: the same vector-Jacobian product, and finite differences agree
    for a, b in zip(closed, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(RowDot.apply, (p, q))


def test_row_dot_is_used_only_inside_the_block_and_with_gradients_on() -> None:
    model = _model("mf")
    rows = lookup_rows(model, torch.tensor([0, 3]), torch.tensor([[1, 2, 2], [4, 5, 6]]))
    outside = model.score_rows(rows)
    with closed_form_row_gradients(model):
        inside = model.score_rows(rows)
        with torch.no_grad():
            untracked = model.score_rows(rows)
    after = model.score_rows(rows)
    names = [type(fn).__name__ for fn in _graph(inside)]
    assert "RowDotBackward" in names
    assert all("RowDot" not in type(fn).__name__ for x in (outside, after) for fn in _graph(x))
    assert untracked.grad_fn is None and model.closed_form is False  # the block was left
    assert torch.equal(inside, outside) and torch.equal(untracked, outside)  # the same forward values
    p, q = torch.randn(3, 4, requires_grad=True), torch.randn(3, 2, 4, requires_grad=True)
    assert type(row_dot(p, q, closed_form=True).grad_fn).__name__ == "RowDotBackward"
    assert "RowDot" not in type(row_dot(p, q).grad_fn).__name__


def _graph(out: Tensor) -> list:
    """Every autograd node behind ``out``."""
    seen, todo = [], [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.append(fn)
        todo += [child for child, _ in fn.next_functions]
    return seen


# ----------------------------------------------------------------- closed form == autograd
@pytest.mark.parametrize("name", ["mf", "hybrid-mf", "neumf"])
@pytest.mark.parametrize("reads", [7, 40])
def test_closed_form_step_equals_the_autograd_step(name: str, reads: int, monkeypatch) -> None:
    """Clipping and noise on, the same noise generator: every parameter after four steps and a flush agrees."""
    calls: list[bool] = []
    apply = RowDot.apply
    monkeypatch.setattr(RowDot, "apply", lambda p, q: calls.append(True) or apply(p, q))
    models = [_model(name), _model(name)]
    engines = [_engine(dpsgd, m, closed_form=closed) for m, closed in zip(models, (True, False), strict=True)]
    for step in range(4):
        users, items = _batch(10 + step, reads=reads)
        calls.clear()
        stats = [engines[0].step(users, items, _loss(models[0]))]
        assert len(calls) == (0 if name == "neumf" else 1)  # MF scores back-propagate in closed form
        stats.append(engines[1].step(users, items, _loss(models[1])))
        assert len(calls) == (0 if name == "neumf" else 1)  # ... and not on the autograd path
        assert stats[0].clipped_fraction == stats[1].clipped_fraction
        assert stats[0].loss == pytest.approx(stats[1].loss, rel=1e-6)
        torch.testing.assert_close(engines[0].last_norms, engines[1].last_norms, rtol=1e-5, atol=1e-7)
    assert stats[0].clipped_fraction > 0
    for engine in engines:
        engine.flush()
    fast, plain = (m.state_dict() for m in models)
    for n in fast:
        torch.testing.assert_close(fast[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)


def test_varying_batch_sizes_reuse_buffers_and_equal_the_previous_engine() -> None:
    """Poisson batches change size every step (and may be empty): grown or reused buffers give the same steps."""
    models = [_model("mf"), _model("mf")]
    engines = [_engine(module, m) for module, m in zip((dpsgd, dpsgd_reference), models, strict=True)]
    for step, size in enumerate([6, 3, 9, 0, 5, 9]):
        users, items = _batch(20 + step, batch=size)
        for engine, model in zip(engines, models, strict=True):
            engine.step(users, items, _loss(model))
    for engine in engines:
        engine.flush()
    fast, reference = (m.state_dict() for m in models)
    for n in fast:
        torch.testing.assert_close(fast[n], reference[n], rtol=1e-5, atol=1e-6, msg=n)


# ----------------------------------------------------------------- dense layers
class _UntiedHybridMF(HybridMF):
    """HybridMF without the ``0 · b_i`` tie: ``W``'s output is not on a path to any gathered row."""

    def score_rows(self, rows: dict[str, Tensor]) -> Tensor:
        item = rows["item_embedding"] + self.item_text_projection(rows["item_text"])
        return MF.score_rows(self, {**rows, "item_embedding": item})


def _per_sample_grads(model, users, items, names):
    """Each sample's dense gradient of ``names``, one sample at a time."""
    out = []
    for b in range(len(users)):
        model.zero_grad(set_to_none=True)
        _loss(model)(lookup_rows(model, users[b : b + 1], items[b : b + 1])).sum().backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if n in names})
    return out


def test_a_dense_layer_off_the_rows_path_gets_its_exact_per_sample_gradient() -> None:
    # Arrange: W's output reaches the loss, but no gathered row depends on it
    torch.manual_seed(0)
    model = _UntiedHybridMF(NUM_USERS, NUM_ITEMS, DIM, torch.randn(NUM_ITEMS, TEXT_DIM))
    users, items = _batch(3)
    released = [n for n, _ in model.named_parameters() if not n.startswith("user_")]
    brute = _per_sample_grads(copy.deepcopy(model), users, items, released)
    norms = torch.stack([torch.sqrt(sum(x.pow(2).sum() for x in s.values())) for s in brute])
    w = "item_text_projection.weight"
    assert all(float(s[w].norm()) > 0.01 for s in brute)
    before = model.state_dict()[w].clone()
    clip, lr, bbar = 0.05, 0.2, 4.0
    # Act
    engine = dpsgd.SparseDPSGD(model, noise_multiplier=0.0, clip=clip, lr=lr, expected_batch_size=bbar,
                               private_tables=model.user_tables)
    engine.step(users, items, _loss(model))
    # Assert: W's gradient counts in every norm and in the clipped update
    torch.testing.assert_close(engine.last_norms, norms, rtol=1e-5, atol=1e-7)
    assert (norms > clip).all()
    expected = before - lr / bbar * sum(s[w] * min(1.0, clip / float(n)) for s, n in zip(brute, norms, strict=True))
    torch.testing.assert_close(model.state_dict()[w], expected, rtol=1e-5, atol=1e-7)


def _mf_logits(rows: dict[str, Tensor]) -> Tensor:
    """MF's score without its global bias layer."""
    dot = (rows["user_embedding"].unsqueeze(1) * rows["item_embedding"]).sum(-1)
    return dot + rows["user_bias"] + rows["item_bias"].squeeze(-1)


def _bias_called_twice(model):
    return lambda rows: model.score_rows(rows).sum(1) + model.global_bias(torch.zeros(len(rows["user_bias"]), 1)).sum(1)


def _bias_not_called(model):
    return lambda rows: _mf_logits(rows).sum(1)


def _bias_without_gradients(model):
    def per_sample(rows):
        with torch.no_grad():
            offset = model.global_bias(torch.zeros(len(rows["user_bias"]), 1))
        return (_mf_logits(rows) + offset).sum(1)

    return per_sample


def _bias_output_unused(model):
    def per_sample(rows):
        model.global_bias(torch.zeros(len(rows["user_bias"]), 1))
        return _mf_logits(rows).sum(1)

    return per_sample


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (_bias_called_twice, "'global_bias' is called more than once in one forward pass.*one call per step"),
        (_bias_not_called, "'global_bias' is not called by the per-sample loss.*noise only"),
        (_bias_without_gradients, "'global_bias' is called with gradients off.*noise only"),
        (_bias_output_unused, "'global_bias' is called, but the loss does not depend on its output.*noise only"),
    ],
)
def test_a_dense_layer_without_a_per_sample_gradient_is_refused(loss, message: str) -> None:
    # Arrange
    model = _model("mf")
    before = copy.deepcopy(model.state_dict())
    engine = _engine(dpsgd, model)
    users, items = _batch(1)
    # Act / Assert: refused, with the layer named, before any parameter moved
    with pytest.raises(ValueError, match=message):
        engine.step(users, items, loss(model))
    for n, v in model.state_dict().items():
        if n.startswith("item_") or n.startswith("user_"):
            continue  # tables may hold owed noise added before the forward pass
        assert torch.equal(v, before[n]), n
    assert not engine._capturing  # the engine is usable again
    engine.step(users, items, _loss(model))


def test_a_frozen_dense_layer_may_stay_out_of_the_loss() -> None:
    model = _model("mf")
    model.global_bias.value.requires_grad_(False)
    start = model.global_bias.value.detach().clone()
    engine = _engine(dpsgd, model)
    users, items = _batch(2)
    for _ in range(2):
        engine.step(users, items, _bias_not_called(model))
    engine.step(users[:0], items[:0], _bias_not_called(model))  # a noise-only step
    assert torch.equal(model.global_bias.value.detach(), start)  # neither trained nor noised
