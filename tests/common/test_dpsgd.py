"""Correctness of fedrec's DP-SGD step against brute-force, one-sample-at-a-time maths."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
from scipy import stats

from common.models import build_model, lookup_rows
from common.privacy.dpsgd import (
    CsprngNormal,
    NoiseSource,
    SparseDPSGD,
    TorchNormal,
    _duplicate_aware_sq_norms,
    csprng_standard_normal,
)
from tests.fakes import bce_l2_loss as _loss

NUM_USERS, NUM_ITEMS, DIM = 12, 30, 8


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(name, NUM_USERS, NUM_ITEMS, DIM, (16, 8))


def _batch(seed: int = 1, batch: int = 6, reads: int = 7):
    g = torch.Generator().manual_seed(seed)
    users = torch.randperm(NUM_USERS, generator=g)[:batch]
    items = torch.randint(0, NUM_ITEMS, (batch, reads), generator=g)
    items[:, 3] = items[:, 0]  # duplicate reads inside a sample
    items[0, 5] = items[1, 2]  # shared rows across samples
    return users, items



def _brute_force_grads(model, users, items, released):
    """Per-sample gradients of the released parameters, one sample at a time (dense)."""
    out = []
    for b in range(len(users)):
        model.zero_grad(set_to_none=True)
        rows = lookup_rows(model, users[b : b + 1], items[b : b + 1])
        _loss(model)(rows).sum().backward()
        out.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters() if n in released})
    model.zero_grad(set_to_none=True)
    return out


def _released(model, private_tables):
    private = {f"{t}.weight" for t in private_tables}
    return [n for n, _ in model.named_parameters() if n not in private]


@pytest.mark.parametrize("name", ["mf", "neumf"])
def test_no_noise_no_clip_equals_plain_sgd(name: str) -> None:
    """σ=0, C=∞: the private step is SGD on Σ_b L_b (η/B̄ shared, η_u on user rows)."""
    users, items = _batch()
    model, reference = _model(name), _model(name)
    lr, bbar, user_lr = 0.3, 4.0, 0.7
    engine = SparseDPSGD(model, noise_multiplier=0.0, clip=math.inf, lr=lr, expected_batch_size=bbar, private_tables=model.user_tables, private_lr=user_lr)
    engine.step(users, items, _loss(model))
    user_params = [p for n, p in reference.named_parameters() if n.startswith("user_")]
    shared_params = [p for n, p in reference.named_parameters() if not n.startswith("user_")]
    opt = torch.optim.SGD([{"params": shared_params, "lr": lr / bbar}, {"params": user_params, "lr": user_lr}])
    _loss(reference)(lookup_rows(reference, users, items)).sum().backward()
    opt.step()
    for (n, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["mf", "neumf"])
@pytest.mark.parametrize("private", [True, False])
@pytest.mark.parametrize("reads", [7, 40])  # Gram form / sort form of duplicate-aware norms
def test_per_sample_norms_and_clipping_match_brute_force(name: str, private: bool, reads: int) -> None:
    users, items = _batch(reads=reads)
    model = _model(name)
    private_tables = model.user_tables if private else ()
    released = _released(model, private_tables)
    brute = _brute_force_grads(copy.deepcopy(model), users, items, released)
    brute_norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in s.values())) for s in brute])

    clip, lr, bbar = 0.05, 0.1, 5.0
    before = copy.deepcopy(model.state_dict())
    engine = SparseDPSGD(model, noise_multiplier=0.0, clip=clip, lr=lr, expected_batch_size=bbar, private_tables=private_tables, private_lr=0.0)
    engine.step(users, items, _loss(model))
    torch.testing.assert_close(engine.last_norms, brute_norms, rtol=1e-5, atol=1e-7)
    assert (brute_norms > clip).all(), "choose C so that every sample is clipped"

    clipped = [{n: g * min(1.0, clip / float(norm)) for n, g in s.items()} for s, norm in zip(brute, brute_norms, strict=True)]
    for s in clipped:  # every clipped per-sample gradient has norm <= C
        assert float(torch.sqrt(sum(g.pow(2).sum() for g in s.values()))) <= clip * (1 + 1e-5)
    after = model.state_dict()
    for n in released:
        expected = before[n] - lr / bbar * sum(s[n] for s in clipped)
        torch.testing.assert_close(after[n], expected, rtol=1e-5, atol=1e-7, msg=n)


def test_duplicate_aware_norm_sums_repeated_reads_first() -> None:
    ids = torch.tensor([[3, 3, 5]])
    grads = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
    # row 3 read twice: its gradient is (2, 0); row 5: (0, 2) -> ||g||^2 = 4 + 4
    assert _duplicate_aware_sq_norms(ids, [grads], vocab=10).item() == pytest.approx(8.0)


def _zero_loss(model):
    # Scores the rows but has zero gradient: the update is the noise alone.
    def per_sample(rows):
        return model.score_rows(rows).sum(1) * 0.0

    return per_sample


def _noise_run(lazy: bool, seed: int, steps: int = 6, noise: NoiseSource | None = None):
    model = _model("mf")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = None if noise is not None else torch.Generator().manual_seed(seed)
    engine = SparseDPSGD(model, noise_multiplier=1.3, clip=0.5, lr=2.0, expected_batch_size=4.0, private_tables=(), generator=g, lazy=lazy, noise=noise)
    pattern = torch.Generator().manual_seed(99)  # the same batches for every seed
    for step in range(steps):
        batch = 0 if step == 2 else 3  # one empty (noise-only) step
        users = torch.randint(0, NUM_USERS, (batch,), generator=pattern)
        items = torch.randint(0, 5, (batch, 2), generator=pattern)  # rows 5.. never read
        engine.step(users, items, _zero_loss(model))
    engine.flush()
    engine.close()
    return {n: (p.detach() - start[n]) for n, p in model.named_parameters()}, engine


@pytest.mark.parametrize("source", ["torch", "csprng"])
def test_noise_std_matches_sigma_times_clip(source: str) -> None:
    steps = 6
    # "csprng": the OS CSPRNG itself (os.urandom), as privacy.noise-generator = "csprng" uses it.
    runs = [
        _noise_run(lazy=True, seed=s, steps=steps, noise=CsprngNormal() if source == "csprng" else None)
        for s in range(30)
    ]
    per_step = 1.3 * 0.5 * 2.0 / 4.0  # σ·C·η/B̄, per coordinate and step
    for name in ("item_embedding.weight", "user_embedding.weight", "item_bias.weight"):
        pooled = torch.stack([diffs[name] for diffs, _ in runs])
        std = float(pooled.pow(2).mean().sqrt())  # the mean is 0
        assert std == pytest.approx(per_step * math.sqrt(steps), rel=0.06), name
    assert runs[0][1].step_count == steps


def test_lazy_noise_has_the_distribution_of_dense_noise() -> None:
    lazy = torch.stack([_noise_run(True, s)[0]["item_embedding.weight"] for s in range(150)])
    dense = torch.stack([_noise_run(False, 10_000 + s)[0]["item_embedding.weight"] for s in range(150)])
    # Per-row variance is the dense one, 6 steps of (σ·C·η/B̄)², for rows read often,
    # rarely or never (rows 5.. are never read: all their noise comes from flush()).
    expected = torch.full((NUM_ITEMS,), 6 * (1.3 * 0.5 * 2.0 / 4.0) ** 2)
    torch.testing.assert_close(lazy.var(0).mean(-1), expected, rtol=0.2, atol=0.0)
    torch.testing.assert_close(dense.var(0).mean(-1), expected, rtol=0.2, atol=0.0)
    # And the pooled samples come from the same distribution.
    result = stats.ks_2samp(lazy.flatten().numpy(), dense.flatten().numpy())
    assert result.pvalue > 0.01
    # Zero mean, independent of how often a row was read.
    assert abs(float(lazy.mean())) < 0.02


def test_empty_batch_is_a_noise_only_step() -> None:
    model = _model("neumf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = SparseDPSGD(model, noise_multiplier=1.0, clip=1.0, lr=1.0, expected_batch_size=2.0, private_tables=model.user_tables, generator=torch.Generator().manual_seed(0))
    result = engine.step(torch.zeros(0, dtype=torch.long), torch.zeros((0, 3), dtype=torch.long), _zero_loss(model))
    engine.flush()
    assert result.batch_size == 0 and math.isnan(result.loss)
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (not n.startswith("user_")), n  # released params noised, user rows untouched


def test_rejects_noise_without_finite_clip() -> None:
    with pytest.raises(ValueError, match="finite clip"):
        SparseDPSGD(_model("mf"), noise_multiplier=1.0, clip=math.inf, lr=0.1, expected_batch_size=1.0)


def _seeded_bytes(seed: int):
    """A deterministic stand-in for os.urandom (tests the transform, not the entropy)."""
    rng = np.random.default_rng(seed)
    return rng.bytes


def test_csprng_sampler_mean_and_std_over_a_million_draws() -> None:
    # Arrange / Act
    z = csprng_standard_normal(1_000_000, entropy=_seeded_bytes(0))
    # Assert: standard errors are 1e-3 (mean) and 7e-4 (std); allow ~4 of them
    assert z.shape == (1_000_000,) and z.dtype == np.float64
    assert abs(z.mean()) < 4e-3
    assert abs(z.std() - 1.0) < 3e-3
    assert np.abs(z).max() < 8.58  # the Box–Muller bound with 53-bit uniforms


def test_csprng_sampler_passes_a_ks_test_against_the_standard_normal() -> None:
    # Arrange / Act: the transform on fixed bytes, and on the OS CSPRNG itself
    fixed = csprng_standard_normal(200_001, entropy=_seeded_bytes(1))  # odd: the last pair is cut
    live = csprng_standard_normal(200_000)
    # Assert
    assert stats.kstest(fixed, "norm").pvalue > 0.01
    assert stats.kstest(live, "norm").pvalue > 1e-4
    # Pairs from Box–Muller are independent: the two halves of each pair are uncorrelated.
    assert abs(np.corrcoef(fixed[0:-1:2], fixed[1::2])[0, 1]) < 0.01


def test_csprng_sampler_uses_os_urandom_and_checks_its_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: record the requests that reach os.urandom
    asked: list[int] = []
    real = os.urandom

    def spy(n: int) -> bytes:
        asked.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", spy)
    # Act
    CsprngNormal(entropy=os.urandom).standard_normal((3, 5), torch.device("cpu"))
    csprng_standard_normal(3, entropy=os.urandom)
    # Assert: 16 bytes per pair of draws, and os.urandom is the default entropy
    assert asked == [16 * 8, 16 * 2]
    assert CsprngNormal().entropy is real
    with pytest.raises(ValueError, match="entropy returned 3 bytes"):
        csprng_standard_normal(2, entropy=lambda n: b"abc")
    assert csprng_standard_normal(0).shape == (0,)


def test_csprng_noise_source_gives_float32_tensors_of_the_shape() -> None:
    # Act
    z = CsprngNormal(entropy=_seeded_bytes(2)).standard_normal((4, 7), torch.device("cpu"))
    # Assert
    assert z.shape == (4, 7) and z.dtype == torch.float32
    assert torch.isfinite(z).all() and len(torch.unique(z)) == 28


def test_dp_step_with_the_csprng_runs_and_is_not_reproducible() -> None:
    # Arrange / Act: two runs of the same steps
    first, _ = _noise_run(lazy=True, seed=0, noise=CsprngNormal())
    second, _ = _noise_run(lazy=True, seed=0, noise=CsprngNormal())
    seeded, _ = _noise_run(lazy=True, seed=0, noise=TorchNormal(torch.Generator().manual_seed(0)))
    again, _ = _noise_run(lazy=True, seed=0)
    # Assert: OS entropy differs every run; a seeded torch generator repeats
    assert not torch.equal(first["item_embedding.weight"], second["item_embedding.weight"])
    assert torch.equal(seeded["item_embedding.weight"], again["item_embedding.weight"])


def test_rejects_both_a_noise_source_and_a_generator() -> None:
    with pytest.raises(ValueError, match="not both"):
        SparseDPSGD(_model("mf"), noise_multiplier=1.0, clip=1.0, lr=0.1, expected_batch_size=1.0,
                    generator=torch.Generator(), noise=CsprngNormal())


@pytest.mark.parametrize("name", ["mf", "neumf"])
@pytest.mark.parametrize("reads", [7, 40])  # Gram form / sort form of duplicate-aware norms
@pytest.mark.parametrize("vocab_reads", ["marks", "sort"])  # how the rows read are listed
def test_fast_step_equals_the_previous_engine(name: str, reads: int, vocab_reads: str, monkeypatch) -> None:
    """The fast path (autograd.grad, index_select, scatter_add_, marked rows) equals the engine it replaced.

    Same model, batches and noise generator, clipping and noise on: every parameter after
    four steps and a flush agrees to float32 rounding (rtol 1e-5, atol 1e-6).
    """
    from common.privacy import dpsgd
    from tests.common import dpsgd_reference

    if vocab_reads == "sort":
        monkeypatch.setattr(dpsgd, "_MARK_MAX_RATIO", 0)
    models = [_model(name), _model(name)]
    engines = [
        module.SparseDPSGD(model, noise_multiplier=0.8, clip=0.05, lr=0.3, expected_batch_size=5.0,
                           private_tables=model.user_tables, private_lr=0.2,
                           generator=torch.Generator().manual_seed(7))
        for module, model in zip((dpsgd, dpsgd_reference), models, strict=True)
    ]
    for step in range(4):
        users, items = _batch(seed=10 + step, reads=reads)
        stats = [engine.step(users, items, _loss(model)) for engine, model in zip(engines, models, strict=True)]
        assert stats[0].clipped_fraction == stats[1].clipped_fraction
        assert stats[0].loss == pytest.approx(stats[1].loss, rel=1e-6)
        torch.testing.assert_close(engines[0].last_norms, engines[1].last_norms, rtol=1e-5, atol=1e-7)
    for engine in engines:
        engine.flush()
    fast, reference = (m.state_dict() for m in models)
    for n in fast:
        torch.testing.assert_close(fast[n], reference[n], rtol=1e-5, atol=1e-6, msg=n)
