"""DP-SGD for embedding recommenders: sparse per-sample clipping and lazy noise.

Opacus' per-sample gradients for ``nn.Embedding`` materialise a
(batch × catalogue × dim) tensor; this engine never does. Per step:

1. The rows a batch reads are gathered from each embedding table and made
   autograd leaves, one copy per sample, so a single ordinary backward pass
   yields each sample's gradient for exactly the rows it touched (O(B·T·d)).
   Dense layers (NeuMF's MLP and output layer, the global bias, HybridMF's text
   projection) get per-sample gradient *norms* from Opacus' ghost-norm (or
   grad-sample) functions fed by their inputs (kept by forward hooks) and the
   gradient at their outputs (differentiated in the same backward pass), and
   their clipped sum from one matmul over all reads. A trainable dense layer the
   loss does not use exactly once is refused (it would get noise only). MF's
   score back-propagates to the rows in closed form
   (:func:`common.models.closed_form_row_gradients`).
2. Each sample's gradient norm over all *released* parameters is exact and
   duplicate-aware: an item read twice by one sample counts as the sum of both
   reads (‖Σ_{t: id_t = r} g_t‖², summed over distinct rows r).
3. Each sample is scaled by ``min(1, C / ‖g_b‖)``; the clipped rows are
   ``index_add``-ed into their tables, dense gradients summed.
4. Gaussian noise N(0, σ²C²) (from a :class:`NoiseSource`: torch's generator, or
   the OS CSPRNG with :class:`CsprngNormal`) is added to the sum; the update is
   ``θ ← θ − η/B̄ · (Σ_b clip(g_b) + noise)`` with B̄ the *expected* batch size
   (Poisson sampling). Embedding tables get their noise lazily (plain SGD only):
   a row not read between steps t₁ and t₂ owes the sum of its noise, one draw of
   N(0, (t₂ − t₁)·σ²C²)·(η/B̄)², added the next time it is read and by
   :meth:`SparseDPSGD.flush` before the table is released. Intermediate
   iterates are never released, so the output has the distribution of dense
   DP-SGD, and a step costs O(B·T·d) whatever the catalogue size.

Tables listed as ``private_tables`` (the users' own rows under user-level DP)
are neither clipped nor noised: their gradient is that user's own, they never
leave the silo, and they are updated with their own learning rate.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from numpy.typing import NDArray
from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample
from torch import Tensor, nn

from common.models import GlobalBias, Recommender, closed_form_row_gradients, feature_rows

PerSampleLoss = Callable[[dict[str, Tensor]], Tensor]


class NoiseSource(Protocol):
    """Where DP-SGD's Gaussian noise comes from."""

    def standard_normal(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Independent N(0, 1) draws (float32) of ``shape`` on ``device``."""
        ...


@dataclass(frozen=True, slots=True)
class TorchNormal:
    """``torch.randn`` from a torch generator (``privacy.noise-generator = "os-seeded"``).

    torch's CPU generator is a Mersenne Twister (mt19937) and its CUDA generator
    Philox4x32-10: fast, but not cryptographically secure. fedrec seeds it with 63
    bits from :func:`secrets.randbits` each round.
    """

    generator: torch.Generator | None = None

    def standard_normal(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """``torch.randn(shape)`` from :attr:`generator`."""
        return torch.randn(shape, generator=self.generator, device=device)


@dataclass(frozen=True, slots=True)
class CsprngNormal:
    """N(0, 1) from the operating system's CSPRNG (``privacy.noise-generator = "csprng"``).

    Draws come from :func:`csprng_standard_normal` over ``entropy`` (default
    :func:`os.urandom`, the kernel's CSPRNG), in float64, then rounded to float32
    and copied to the device.
    """

    entropy: Callable[[int], bytes] = os.urandom

    def standard_normal(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """``shape`` draws of N(0, 1) as a float32 tensor on ``device``."""
        z = csprng_standard_normal(math.prod(shape), entropy=self.entropy)
        return torch.from_numpy(z.astype(np.float32)).reshape(shape).to(device)


# 2**-53: turns the top 53 bits of a uint64 into a float64 in [0, 1) exactly.
_TWO_POW_MINUS_53 = 2.0**-53


def csprng_standard_normal(n: int, *, entropy: Callable[[int], bytes] = os.urandom) -> NDArray[np.float64]:
    """``n`` independent N(0, 1) draws from the random bytes of ``entropy`` (Box–Muller, float64).

    Each pair of draws takes 16 bytes: two 53-bit uniforms u₁ ∈ (0, 1] and
    u₂ ∈ [0, 1), and gives √(−2 ln u₁)·(cos 2πu₂, sin 2πu₂) (Box & Muller, 1958).
    With u₁ ≥ 2⁻⁵³ the draws are bounded by √(106 ln 2) ≈ 8.57, which cuts off a
    tail of probability about 10⁻¹⁷.

    Notes
    -----
    The draws are only as unpredictable as ``entropy``; with :func:`os.urandom` that
    is the kernel's CSPRNG. They are floating-point numbers: this does nothing
    against attacks on the floating-point representation of noisy values
    (Mironov, CCS 2012).
    """
    if n < 0:
        raise ValueError(f"number of draws must be >= 0, got {n}")
    pairs = (n + 1) // 2
    raw = entropy(16 * pairs)
    if len(raw) != 16 * pairs:
        raise ValueError(f"entropy returned {len(raw)} bytes, {16 * pairs} were asked for")
    words = np.frombuffer(raw, dtype="<u8").reshape(pairs, 2)
    u1 = ((words[:, 0] >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * _TWO_POW_MINUS_53  # (0, 1]
    u2 = (words[:, 1] >> np.uint64(11)).astype(np.float64) * _TWO_POW_MINUS_53  # [0, 1)
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * math.pi * u2
    z = np.empty(2 * pairs, dtype=np.float64)
    z[0::2] = radius * np.cos(angle)
    z[1::2] = radius * np.sin(angle)
    return z[:n]


# Layers with a per-sample gradient rule (see SparseDPSGD._dense_part).
DENSE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, GlobalBias)


@dataclass(frozen=True, slots=True)
class StepStats:
    """What one DP-SGD step did."""

    batch_size: int
    loss: float  # mean per-sample loss (nan for an empty batch)
    clipped_fraction: float  # samples whose norm exceeded C (nan for an empty batch)


class SparseDPSGD:
    """DP-SGD with plain SGD on one recommender (see module docstring).

    Parameters
    ----------
    model : Recommender
        Trained in place. Its hooks are removed by :meth:`close`.
    noise_multiplier : float
        σ: noise std per coordinate is σ·C on the sum of clipped gradients.
    clip : float
        C, the per-sample L2 norm bound over all released parameters (``inf`` = none).
    lr : float
        η for the released parameters; the update divides by ``expected_batch_size``.
    expected_batch_size : float
        B̄ = q·N under Poisson sampling (never the realised batch size, which leaks).
    private_tables : iterable of str
        Embedding tables trained without clipping or noise (users' own rows).
    private_lr : float
        Learning rate for the private rows (applied to each user's own gradient).
    generator : torch.Generator, optional
        Source of the Gaussian noise when ``noise`` is not given (:class:`TorchNormal`).
    noise : NoiseSource, optional
        Source of the Gaussian noise, e.g. :class:`CsprngNormal`; not with ``generator``.
    lazy : bool
        Lazy table noise (default). ``False`` adds dense noise to every row of every
        noised table each step: the reference the lazy form is tested against.
    closed_form : bool
        Run the forward pass inside :func:`common.models.closed_form_row_gradients`
        (default): MF's score back-propagates to the gathered rows by its closed-form
        gradient instead of autograd's batched matrix products. The gradients are the
        same; ``False`` is the plain-autograd path it is tested against.

    Raises
    ------
    ValueError
        At construction, for a parameter outside the embedding tables and the
        layers with a per-sample rule (:data:`DENSE_LAYERS`); at a step, for a
        trainable dense layer that the per-sample loss does not call, calls with
        gradients off, calls more than once, or whose output the loss does not use:
        its per-sample gradient would be missing and it would get noise only.
    """

    def __init__(
        self,
        model: Recommender,
        *,
        noise_multiplier: float,
        clip: float,
        lr: float,
        expected_batch_size: float,
        private_tables: Iterable[str] = (),
        private_lr: float = 0.0,
        generator: torch.Generator | None = None,
        lazy: bool = True,
        noise: NoiseSource | None = None,
        closed_form: bool = True,
    ) -> None:
        if noise is not None and generator is not None:
            raise ValueError("pass a noise source or a torch generator, not both")
        if noise_multiplier < 0 or clip <= 0 or lr <= 0 or expected_batch_size <= 0:
            raise ValueError("noise_multiplier >= 0, clip > 0, lr > 0, expected batch > 0")
        if noise_multiplier > 0 and math.isinf(clip):
            raise ValueError("noise needs a finite clip norm")
        self.model = model
        self.sigma = noise_multiplier
        self.clip = clip
        self.lr = lr
        self.expected_batch_size = expected_batch_size
        self.private = tuple(private_tables)
        self.private_lr = private_lr
        self.noise = noise if noise is not None else TorchNormal(generator)
        # fedrec's own sources return a new tensor per call; another source's may be shared.
        self._fresh_noise = type(self.noise) in (TorchNormal, CsprngNormal)
        self.lazy = lazy
        self.closed_form = closed_form
        self.last_norms = torch.zeros(0)  # per-sample norms of the last step (diagnostics)
        self.user_tables = tuple(model.user_tables)
        self.item_tables = tuple(model.item_tables)
        unknown = set(self.private) - set(self.user_tables) - set(self.item_tables)
        if unknown:
            raise ValueError(f"private tables {sorted(unknown)} are not tables of the model")
        self.noised = tuple(t for t in (*self.user_tables, *self.item_tables) if t not in self.private)
        self.step_count = 0
        device = next(model.parameters()).device
        # Noised tables indexed by the same ids (user tables; item tables) share one
        # record of the step up to which each row has received its noise.
        self._groups = {
            group: tuple(t for t in tables if t in self.noised)
            for group, tables in (("user", self.user_tables), ("item", self.item_tables))
        }
        self._groups = {g: tables for g, tables in self._groups.items() if tables}
        self._noised_up_to = {
            group: torch.zeros(self._table(tables[0]).num_embeddings, dtype=torch.long, device=device)
            for group, tables in self._groups.items()
        }
        # Fixed per-engine lists, so a step does no look-ups by name.
        self._weights = {t: self._table(t).weight for t in (*self.user_tables, *self.item_tables)}
        self._user_noised = tuple(t for t in self.user_tables if t in self.noised)
        self._item_noised = tuple(t for t in self.item_tables if t in self.noised)
        self._grad_names = (*self.noised, *self.private)
        self._dense_layers = self._find_dense_layers()
        self._layer_names = {module: name or type(module).__name__ for name, module in model.named_modules()}
        self._captured: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        self._capturing = False
        self._handles = [m.register_forward_hook(self._capture) for m in self._dense_layers]
        self._buffers: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ setup
    def _table(self, name: str) -> nn.Embedding:
        return getattr(self.model, name)

    def _find_dense_layers(self) -> list[nn.Module]:
        """The layers with a per-sample rule that hold trainable parameters."""
        tables = {id(self._table(t).weight) for t in (*self.user_tables, *self.item_tables)}
        covered = set(tables)
        layers = []
        for module in self.model.modules():
            if isinstance(module, DENSE_LAYERS):
                own = list(module.parameters(recurse=False))
                covered |= {id(p) for p in own}
                if any(p.requires_grad for p in own):
                    layers.append(module)
        uncovered = [n for n, p in self.model.named_parameters() if id(p) not in covered]
        if uncovered:
            raise ValueError(f"no per-sample gradient rule for parameters {uncovered}")
        return layers

    def _capture(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        """Keep a dense layer's input and output of this step's forward pass."""
        if not self._capturing:
            return
        if module in self._captured:
            raise ValueError(
                f"dense layer {self._layer_names[module]!r} is called more than once in one forward pass: "
                "its per-sample gradient rule needs exactly one call per step (use one call on all reads)"
            )
        self._captured[module] = (inputs[0].detach(), output)

    def _dense_outputs(self) -> list[Tensor]:
        """The outputs of every dense layer in this step's forward pass (each must have one)."""
        outputs = []
        for module in self._dense_layers:
            captured = self._captured.get(module)
            if captured is None or not captured[1].requires_grad:
                how = "is not called by the per-sample loss" if captured is None else "is called with gradients off"
                raise self._no_gradient(module, how)
            outputs.append(captured[1])
        return outputs

    def _no_gradient(self, module: nn.Module, how: str) -> ValueError:
        return ValueError(
            f"dense layer {self._layer_names[module]!r} {how}: DP-SGD would get no per-sample gradient for "
            "it and train it on noise only. Use it in the loss once per step, or freeze its parameters "
            "(requires_grad=False)."
        )

    def close(self) -> None:
        """Remove the hooks from the model (flush first if the tables are released)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _buffer(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A reusable scratch tensor of ``shape`` (grown when a larger batch comes)."""
        size = math.prod(shape)
        flat = self._buffers.get(key)
        if flat is None or flat.numel() < size or flat.dtype != like.dtype or flat.device != like.device:
            flat = torch.empty(size, dtype=like.dtype, device=like.device)
            self._buffers[key] = flat
        return flat[:size].view(shape)

    # ------------------------------------------------------------------ noise
    def _row_noise_std(self) -> float:
        return self.sigma * self.clip * self.lr / self.expected_batch_size

    def _add_owed_noise(self, group: str, rows: Tensor, up_to: int) -> None:
        """Bring ``rows`` (unique ids) of a table group up to date through step ``up_to``."""
        last = self._noised_up_to[group]
        if self.sigma == 0.0 or rows.numel() == 0:
            last[rows] = up_to
            return
        owed = last.index_select(0, rows).neg_().add_(up_to).clamp_(min=0)
        std = owed.to(torch.float32).sqrt_().mul_(self._row_noise_std())[:, None]
        with torch.no_grad():
            for name in self._groups[group]:
                weight = self._weights[name]
                noise = self.noise.standard_normal((len(rows), weight.shape[1]), weight.device)
                if self._fresh_noise:  # scaled in place: the draws are this engine's own tensor
                    scaled = noise.mul_(std)
                else:
                    scaled = torch.mul(noise, std, out=self._buffer("noise", tuple(noise.shape), weight))
                weight.detach().index_add_(0, rows, scaled)  # distinct rows
        last[rows] = up_to

    def _all_rows(self, group: str) -> Tensor:
        last = self._noised_up_to[group]
        return torch.arange(len(last), device=last.device)

    def flush(self) -> None:
        """Add all owed noise to every row (call before releasing the tables)."""
        for group in self._groups:
            self._add_owed_noise(group, self._all_rows(group), self.step_count)

    # ------------------------------------------------------------------ step
    def step(self, users: Tensor, items: Tensor, per_sample_loss: PerSampleLoss) -> StepStats:
        """One DP-SGD step on the Poisson batch ``users`` (B,), ``items`` (B, T).

        ``per_sample_loss(rows)`` gets the looked-up rows (see
        :func:`common.models.lookup_rows`) and returns each sample's loss (B,).
        An empty batch is a noise-only step.
        """
        self.step_count += 1
        batch = len(users)
        # 1. rows read this step must hold the noise of every earlier step; this
        #    step's noise stays owed until the row is next read or flushed.
        for group in self._groups:
            if self.lazy:
                rows_read = self._distinct_rows(group, users if group == "user" else items)
            else:
                rows_read = self._all_rows(group)
            self._add_owed_noise(group, rows_read, self.step_count - 1)
        if batch == 0:
            self._dense_noise_only()
            return StepStats(0, math.nan, math.nan)

        # 2. forward/backward with gathered rows as leaves; autograd.grad returns
        #    their gradients without accumulating into .grad (no copies) and skips
        #    the dense parameters' own gradients (their clipped sum comes from the
        #    captured activations).
        user_ids, item_ids = users.reshape(-1), items.reshape(-1)
        rows = {name: _gather(self._weights[name], user_ids, users.shape) for name in self.user_tables}
        rows.update({name: _gather(self._weights[name], item_ids, items.shape) for name in self.item_tables})
        leaves = [rows[n] for n in self._grad_names]
        rows.update(feature_rows(self.model, items))  # fixed item features (HybridMF's text), no gradient
        self._captured.clear()
        self._capturing = True
        try:
            with closed_form_row_gradients(self.model) if self.closed_form else contextlib.nullcontext():
                losses = per_sample_loss(rows)
            if losses.shape != (batch,):
                raise ValueError(f"per-sample loss must have shape ({batch},), got {tuple(losses.shape)}")
            # The dense layers' outputs are differentiated too: the gradient at a layer's
            # output is what its per-sample rule needs, whether or not the output lies
            # on a path to the gathered rows (HybridMF's text projection need not).
            outputs = self._dense_outputs()
            found = torch.autograd.grad(losses.sum(), [*leaves, *outputs], allow_unused=True)
        finally:
            self._capturing = False
        grads = dict(zip(self._grad_names, map(_grad, found[: len(leaves)]), strict=True))
        backprops = found[len(leaves) :]

        # 3. exact per-sample norms over released parameters, clip factors
        sq = torch.zeros(batch, device=users.device)
        for name in self._user_noised:
            sq += _sq_norms(grads[name])
        if self._item_noised:
            sq += _duplicate_aware_sq_norms(
                items, [grads[n] for n in self._item_noised], self._table(self._item_noised[0]).num_embeddings
            )
        dense = [
            self._dense_part(module, backprop, batch)
            for module, backprop in zip(self._dense_layers, backprops, strict=True)
        ]
        for part_sq, _ in dense:
            sq += part_sq
        norms = sq.sqrt_()
        self.last_norms = norms
        finite = math.isfinite(self.clip)
        factor = (self.clip / (norms + 1e-6)).clamp_(max=1.0) if finite else torch.ones_like(norms)

        # 4. update: clipped sum + noise, scaled by η / B̄
        scale = self.lr / self.expected_batch_size
        with torch.no_grad():
            step_factor = factor * -scale
            for name in self.noised:
                self._add_scaled_rows(name, users if name in self.user_tables else items, grads[name], step_factor)
            for name in self.private:  # one scalar factor: index_add_'s alpha, no scaled copy
                ids = users if name in self.user_tables else items
                weight = self._weights[name]
                grad = grads[name].detach().reshape(ids.numel(), weight.shape[1])
                weight.detach().index_add_(0, ids.reshape(-1), grad, alpha=-self.private_lr)
            for _, clipped_sum in dense:
                for param, total in clipped_sum(factor).items():
                    param.sub_(scale * (total + self._dense_noise(param)))
        self._captured.clear()
        clipped = float((norms > self.clip).float().mean()) if finite else 0.0
        return StepStats(batch, float(losses.detach().mean()), clipped)

    def _add_scaled_rows(self, name: str, ids: Tensor, grad: Tensor, factor: Tensor | float) -> None:
        """``weight[ids[k]] += factor[b] · grad[k]`` for every read k of sample b (see :func:`_scatter_add`).

        ``grad`` (*ids.shape, D) may have any layout (autograd's gradients are often
        transposed or broadcast views): the product is written once, contiguously,
        into a reusable buffer.
        """
        weight = self._weights[name]
        if isinstance(factor, Tensor):
            factor = factor.view(-1, *([1] * (grad.dim() - 1)))
        out = torch.mul(grad.detach(), factor, out=self._buffer(name, tuple(grad.shape), weight))
        _scatter_add(weight, ids.reshape(-1), out.view(-1, weight.shape[1]))

    def _distinct_rows(self, group: str, ids: Tensor) -> Tensor:
        """The distinct ids in ``ids``, ascending (as ``torch.unique``).

        For a catalogue not much larger than the batch's reads, marking the read rows
        in a boolean table and listing the marks is cheaper than sorting the reads.
        """
        vocab = len(self._noised_up_to[group])
        if vocab > _MARK_MAX_RATIO * ids.numel():
            return torch.unique(ids)
        marks = torch.zeros(vocab, dtype=torch.bool, device=ids.device)
        marks[ids.reshape(-1)] = True
        return marks.nonzero().squeeze(1)

    def _dense_part(
        self, module: nn.Module, backprop: Tensor | None, batch: int
    ) -> tuple[Tensor, Callable[[Tensor], dict[nn.Parameter, Tensor]]]:
        """Per-sample squared norms (B,) of a dense layer and its clipped-sum function.

        ``backprop`` is the gradient of the summed loss at the layer's output.
        """
        if backprop is None:
            raise self._no_gradient(module, "is called, but the loss does not depend on its output")
        activation = self._captured[module][0]
        backprop = backprop.detach()
        if isinstance(module, nn.Linear):
            return _linear_part(module, activation, backprop)
        if isinstance(module, GlobalBias):
            per_sample = backprop.reshape(batch, -1).sum(1)  # (B,)
            return per_sample.pow(2), lambda factor: {module.value: (factor @ per_sample).reshape(1)}
        raise TypeError(f"no per-sample rule for {type(module).__name__}")

    def _dense_noise(self, param: Tensor) -> Tensor:
        if self.sigma == 0.0:
            return torch.zeros_like(param)
        noise = self.noise.standard_normal(tuple(param.shape), param.device)
        return noise * (self.sigma * self.clip)

    def _dense_noise_only(self) -> None:
        scale = self.lr / self.expected_batch_size
        with torch.no_grad():
            for module in self._dense_layers:
                for p in module.parameters(recurse=False):
                    p.sub_(scale * self._dense_noise(p))


def _grad(grad: Tensor | None) -> Tensor:
    """The gradient of a gathered row (it must have one)."""
    if grad is None:
        raise RuntimeError("a gathered row got no gradient: the loss does not use it")
    return grad


def _sq_norms(grads: Tensor) -> Tensor:
    """Per-sample squared L2 norms (B,) of ``grads`` (B, ...) of any layout, in one pass."""
    return torch.linalg.vector_norm(grads, dim=tuple(range(1, grads.dim()))).square_()


def _gather(weight: Tensor, flat_ids: Tensor, shape: torch.Size) -> Tensor:
    """Rows ``weight[ids]`` (``flat_ids`` the ids of ``shape``, flattened) as a new leaf, by ``index_select``."""
    return weight.detach().index_select(0, flat_ids).view(*shape, weight.shape[1]).requires_grad_(True)


def _scatter_add(weight: Tensor, flat_ids: Tensor, rows: Tensor) -> None:
    """``weight[flat_ids[k]] += rows[k]`` for every k, in place; ``rows`` (K, D) contiguous.

    One ``scatter_add_`` (torch's CPU ``index_add_`` loops per row, which is several
    times slower for the 1-wide bias tables). Rows with the same id are added in order.
    """
    width = weight.shape[1]
    weight.detach().scatter_add_(0, flat_ids[:, None].expand(-1, width), rows)


def _linear_part(
    layer: nn.Linear, activation: Tensor, backprop: Tensor
) -> tuple[Tensor, Callable[[Tensor], dict[nn.Parameter, Tensor]]]:
    """Per-sample norms of a Linear layer's gradient, without materialising it when cheaper.

    With T reads per sample, the ghost norm (Opacus' ``compute_linear_norm_sample``:
    Σ_{t,s} (a_t·a_s)(g_t·g_s)) costs B·T²·(in+out); materialising per-sample
    gradients (Opacus' ``compute_linear_grad_sample``) costs B·T·in·out. The cheaper
    one is used. The clipped sum is then one matmul over all reads:
    Σ_b f_b Σ_t g_bt a_btᵀ = (f ⊙ G)ᵀ A.
    """
    a = activation.reshape(len(activation), -1, activation.shape[-1])  # (B, T, in)
    g = backprop.reshape(len(backprop), -1, backprop.shape[-1])  # (B, T, out)
    reads = a.shape[1]
    if reads * (a.shape[-1] + g.shape[-1]) <= a.shape[-1] * g.shape[-1]:
        norms = compute_linear_norm_sample(layer, [a], g)
        sq = sum(n.pow(2) for n in norms.values())
    else:
        samples = compute_linear_grad_sample(layer, [a], g)
        sq = sum(x.reshape(len(x), -1).pow(2).sum(1) for x in samples.values())

    def clipped_sum(factor: Tensor) -> dict[nn.Parameter, Tensor]:
        weighted = (g * factor[:, None, None]).reshape(-1, g.shape[-1])
        out: dict[nn.Parameter, Tensor] = {layer.weight: weighted.T @ a.reshape(-1, a.shape[-1])}  # type: ignore[dict-item]
        if layer.bias is not None:
            out[layer.bias] = weighted.sum(0)
        return out

    return sq, clipped_sum


# Rows read are listed by marking them in a table of the catalogue's size when the
# catalogue has at most this many rows per read (else by sorting the reads).
_MARK_MAX_RATIO = 16

# Up to this many reads per sample, pairwise comparison is cheaper than sorting.
_GRAM_MAX_READS = 32


def _repeated_read_pairs(ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(sample, t, s) with t < s for every two reads of the same row within a sample.

    Compares only the T·(T − 1)/2 pairs t < s (not all T²); sorted by (sample, t, s).
    """
    first, second = torch.triu_indices(ids.shape[1], ids.shape[1], offset=1, device=ids.device)
    same = ids[:, first] == ids[:, second]  # (B, pairs)
    if not bool(same.any()):
        empty = torch.zeros(0, dtype=torch.long, device=ids.device)
        return empty, empty, empty
    b, pair = same.nonzero(as_tuple=True)
    return b, first[pair], second[pair]


def _pairwise_sq_norms(pairs: tuple[Tensor, Tensor, Tensor], grads: Tensor) -> Tensor:
    """Σ_{t,s} [id_t = id_s] ⟨g_t, g_s⟩ per sample = Σ_t ‖g_t‖² + 2 Σ_{t<s, same row} ⟨g_t, g_s⟩.

    Exact; the cross terms are computed only for the (rare) repeated reads.
    """
    sq = _sq_norms(grads)
    b, t, s = pairs
    if len(b):
        sq = sq.index_add(0, b, 2 * (grads[b, t] * grads[b, s]).sum(-1))
    return sq


def _duplicate_aware_sq_norms(ids: Tensor, grads: list[Tensor], vocab: int) -> Tensor:
    """Per-sample ‖g_b‖² where reads of the same row within a sample are summed first.

    ``ids`` (B, T) row ids shared by the tables whose read gradients ``grads`` (each
    (B, T, D)) are given. Returns (B,). For small T: Σ_{t,s} [id_t = id_s] ⟨g_t, g_s⟩
    (exact, pairs found once for all tables); otherwise the reads are grouped by
    (sample, row) with one sort.
    """
    batch, reads = ids.shape
    if reads <= _GRAM_MAX_READS:
        pairs = _repeated_read_pairs(ids)
        return sum((_pairwise_sq_norms(pairs, g) for g in grads), torch.zeros(batch, device=ids.device))
    flat = torch.cat(grads, dim=-1) if len(grads) > 1 else grads[0]
    sample = torch.arange(batch, device=ids.device).repeat_interleave(reads)
    keys = sample * vocab + ids.reshape(-1)
    unique, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros((len(unique), flat.shape[-1]), dtype=flat.dtype, device=flat.device)
    summed.index_add_(0, inverse, flat.reshape(batch * reads, -1))
    out = torch.zeros(batch, dtype=flat.dtype, device=flat.device)
    return out.index_add_(0, unique // vocab, summed.pow(2).sum(1))
