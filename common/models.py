"""Embedding recommenders (biased MF, NeuMF) with a private/shared parameter split.

Every parameter whose name starts with ``user_`` belongs to one silo's users and
never leaves that silo; everything else (item tables, biases, MLP tower, output
layer) is the shared model that the server aggregates.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

PRIVATE_PREFIX = "user_"
ModelName = Literal["mf", "neumf", "hybrid-mf"]


@contextmanager
def closed_form_row_gradients(model: nn.Module) -> Iterator[None]:
    """Within this block, ``model``'s MF score back-propagates through :class:`RowDot`.

    The DP-SGD engine (:mod:`common.privacy.dpsgd`) turns it on around its forward
    pass; the gradients are the same (the exact vector-Jacobian product of the
    score), only computed without batched matrix products. Models without an MF
    score (NeuMF) are unaffected.
    """
    previous = getattr(model, "closed_form", False)
    setattr(model, "closed_form", True)  # noqa: B010 (nn.Module's typed __setattr__ takes tensors and modules)
    try:
        yield
    finally:
        setattr(model, "closed_form", previous)  # noqa: B010


# Up to this many items per sample, RowDot's ∂L/∂p is summed read by read.
_ROW_DOT_LOOP_READS = 8


class RowDot(torch.autograd.Function):
    """``s[b, t] = <p[b], q[b, t]>`` with its gradients written in closed form.

    Forward is ``einsum("bd,btd->bt")`` (the same values as :func:`row_dot` without
    the block). Backward, for the upstream gradient ``g = ∂L/∂s`` (B, T):
    ``∂L/∂p[b] = Σ_t g[b, t] · q[b, t]`` and ``∂L/∂q[b, t] = g[b, t] · p[b]``, two
    elementwise passes; autograd's ``einsum`` backward runs them as (B × 1 × T × D)
    batched matrix products, which on a CPU cost several times more at D = 64, T ≤ 32.
    The row gradients come out contiguous.
    """

    @staticmethod
    def forward(p: Tensor, q: Tensor) -> Tensor:  # type: ignore[override]
        """Scores (B, T) of ``p`` (B, D) against ``q`` (B, T, D)."""
        return torch.einsum("bd,btd->bt", p, q)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        """Keep both inputs for the backward pass."""
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        """``(∂L/∂p, ∂L/∂q)`` from ``g = ∂L/∂s``."""
        p, q = ctx.saved_tensors
        upstream = g.unsqueeze(-1)  # (B, T, 1)
        grad_p = None
        if ctx.needs_input_grad[0]:
            if q.shape[1] <= _ROW_DOT_LOOP_READS:  # T passes of (B, D), no (B, T, D) temporary
                grad_p = q[:, 0] * upstream[:, 0]
                for t in range(1, q.shape[1]):
                    grad_p.addcmul_(q[:, t], upstream[:, t])
            else:
                grad_p = (upstream * q).sum(1)
        grad_q = upstream * p.unsqueeze(1) if ctx.needs_input_grad[1] else None
        return grad_p, grad_q


def row_dot(p: Tensor, q: Tensor, *, closed_form: bool = False) -> Tensor:
    """Scores (B, T): ``<p[b], q[b, t]>`` for ``p`` (B, D), ``q`` (B, T, D).

    With ``closed_form`` (and gradients on) through :class:`RowDot`; otherwise plain
    ``einsum``, whose autograd backward is the reference the closed form is tested against.
    """
    if closed_form and torch.is_grad_enabled():
        out: Tensor = RowDot.apply(p, q)
        return out
    return torch.einsum("bd,btd->bt", p, q)


class GlobalBias(nn.Module):
    """A single learned offset (a submodule, so Opacus' functorch mode can wrap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(1))

    def forward(self, logits: Tensor) -> Tensor:
        """Add the offset to ``logits``."""
        return logits + self.value


class MF(nn.Module):
    """Biased matrix factorisation: ``s(u, i) = <p_u, q_i> + b_u + b_i + b``.

    Parameters
    ----------
    num_users, num_items : int
        Rows of the user (private) and item (shared) tables.
    dim : int
        Embedding dimension.
    init_std : float
        Standard deviation of the normal initialisation of embeddings.
    """

    def __init__(
        self, num_users: int, num_items: int, dim: int, init_std: float = 0.1
    ) -> None:
        super().__init__()
        self.user_embedding = nn.Embedding(num_users, dim)
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_embedding = nn.Embedding(num_items, dim)
        self.item_bias = nn.Embedding(num_items, 1)
        self.global_bias = GlobalBias()
        for table in (self.user_embedding, self.item_embedding):
            nn.init.normal_(table.weight, std=init_std)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    user_tables = ("user_embedding", "user_bias")
    item_tables = ("item_embedding", "item_bias")
    l2_tables = ("user_embedding", "item_embedding")
    closed_form = False  # score back-propagates through RowDot (see closed_form_row_gradients)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """Score ``items`` (B, T) for ``users`` (B,); returns logits (B, T)."""
        return self.score_rows(lookup_rows(self, users, items))

    def score_rows(self, rows: dict[str, Tensor]) -> Tensor:
        """Logits (B, T) from looked-up rows: user tables (B, D), item tables (B, T, D)."""
        dot = row_dot(rows["user_embedding"], rows["item_embedding"], closed_form=self.closed_form)
        bias = rows["user_bias"] + rows["item_bias"].squeeze(-1)  # (B, T)
        return self.global_bias(dot + bias)

    def score_all(self, users: Tensor) -> Tensor:
        """Score every catalogue item for ``users`` (B,); returns (B, I)."""
        p = self.user_embedding(users)
        logits = p @ self.item_embedding.weight.T + self.user_bias(users)
        return self.global_bias(logits + self.item_bias.weight.T)

    def l2_terms(self, users: Tensor, items: Tensor) -> Tensor:
        """Squared norm of the embedding rows a batch touches, per sample (B,)."""
        return l2_rows(self, lookup_rows(self, users, items))


class NeuMF(nn.Module):
    """Neural matrix factorisation (He et al., WWW 2017): GMF and MLP towers fused.

    ``s(u, i) = h^T [p_u ⊙ q_i ; MLP([p'_u ; q'_i])] + b``. User tables of both towers
    are private; item tables, the MLP and the output layer are shared.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        dim: int,
        mlp_layers: Sequence[int] = (64, 32, 16),
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        if not mlp_layers or mlp_layers[0] % 2:
            raise ValueError("mlp_layers must be non-empty and start with an even width")
        mlp_dim = mlp_layers[0] // 2
        self.user_gmf = nn.Embedding(num_users, dim)
        self.user_mlp = nn.Embedding(num_users, mlp_dim)
        self.item_gmf = nn.Embedding(num_items, dim)
        self.item_mlp = nn.Embedding(num_items, mlp_dim)
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(mlp_layers[:-1], mlp_layers[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)
        self.output = nn.Linear(dim + mlp_layers[-1], 1)
        for table in (self.user_gmf, self.user_mlp, self.item_gmf, self.item_mlp):
            nn.init.normal_(table.weight, std=init_std)

    user_tables = ("user_gmf", "user_mlp")
    item_tables = ("item_gmf", "item_mlp")
    l2_tables = ("user_gmf", "user_mlp", "item_gmf", "item_mlp")

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """Score ``items`` (B, T) for ``users`` (B,); returns logits (B, T)."""
        return self.score_rows(lookup_rows(self, users, items))

    def score_rows(self, rows: dict[str, Tensor]) -> Tensor:
        """Logits (B, T) from looked-up rows: user tables (B, D), item tables (B, T, D)."""
        item_mlp = rows["item_mlp"]
        gmf = rows["user_gmf"].unsqueeze(1) * rows["item_gmf"]  # (B, T, D)
        u_mlp = rows["user_mlp"].unsqueeze(1).expand(-1, item_mlp.shape[1], -1)  # (B, T, M)
        mlp = self.mlp(torch.cat([u_mlp, item_mlp], dim=-1))  # (B, T, L)
        return self.output(torch.cat([gmf, mlp], dim=-1)).squeeze(-1)

    def score_all(self, users: Tensor) -> Tensor:
        """Score every catalogue item for ``users`` (B,); returns (B, I)."""
        items = torch.arange(self.item_gmf.num_embeddings, device=users.device)
        return self.forward(users, items.expand(len(users), -1))

    def l2_terms(self, users: Tensor, items: Tensor) -> Tensor:
        """Squared norm of the embedding rows a batch touches, per sample (B,)."""
        return l2_rows(self, lookup_rows(self, users, items))


class HybridMF(MF):
    """Biased MF whose item vector adds a projection of a fixed text embedding.

    ``q_i = e_i + W t_i``: ``e_i`` is the free (shared) item row, zero at the start;
    ``t_i`` the item's fixed text embedding (a non-persistent buffer: public
    catalogue content, never in the state dict nor in a message); ``W``
    (``item_text_projection``, shared, trained federatedly and under DP as a dense
    layer) maps it to the embedding space. An item nobody interacted with has
    ``e_i = 0`` and is scored by ``W t_i`` alone.
    """

    def __init__(self, num_users: int, num_items: int, dim: int, item_text: Tensor, init_std: float = 0.1) -> None:
        super().__init__(num_users, num_items, dim, init_std)
        if item_text.dim() != 2 or len(item_text) != num_items:
            raise ValueError(f"item_text must have shape ({num_items}, D), got {tuple(item_text.shape)}")
        nn.init.zeros_(self.item_embedding.weight)
        self.item_text: Tensor
        self.register_buffer("item_text", item_text.detach().to(torch.float32).clone(), persistent=False)
        self.item_text_projection = nn.Linear(item_text.shape[1], dim, bias=False)
        nn.init.normal_(self.item_text_projection.weight, std=init_std / item_text.shape[1] ** 0.5)

    feature_tables = ("item_text",)

    def feature_rows(self, items: Tensor) -> dict[str, Tensor]:
        """Fixed (untrained) rows of ``items`` (B, T): the text embeddings (B, T, D_text)."""
        return {"item_text": self.item_text[items]}

    def score_rows(self, rows: dict[str, Tensor]) -> Tensor:
        """Logits (B, T): MF on ``e_i + W t_i``.

        ``0 · b_i`` ties the fixed text rows to a gathered table row: it changes no
        value or gradient, but puts ``W``'s output on the path to the rows, so a DP
        engine that differentiates only w.r.t. the gathered rows still back-propagates
        through ``W`` (whose per-sample gradient it reads from that output).
        """
        text = rows["item_text"] + 0.0 * rows["item_bias"]
        item = rows["item_embedding"] + self.item_text_projection(text)
        return super().score_rows({**rows, "item_embedding": item})

    def item_vectors(self) -> Tensor:
        """Every item's vector ``e_i + W t_i`` (I, D)."""
        return self.item_embedding.weight + self.item_text_projection(self.item_text)

    def score_all(self, users: Tensor) -> Tensor:
        """Score every catalogue item for ``users`` (B,); returns (B, I)."""
        logits = self.user_embedding(users) @ self.item_vectors().T + self.user_bias(users)
        return self.global_bias(logits + self.item_bias.weight.T)


Recommender = MF | NeuMF | HybridMF


def feature_rows(model: Recommender, items: Tensor) -> dict[str, Tensor]:
    """The model's fixed per-item rows at ``items`` (none for MF and NeuMF).

    Every row gatherer (training, evaluation, DP-SGD, the local-DP refit) adds these
    to the table rows it gathers, so ``score_rows`` sees them.
    """
    rows = getattr(model, "feature_rows", None)
    return rows(items) if rows is not None else {}


def lookup_rows(model: Recommender, users: Tensor, items: Tensor) -> dict[str, Tensor]:
    """The rows a batch reads: user tables at ``users`` (B,), item tables at ``items`` (B, T).

    Every table is read with a single lookup per batch; DP training substitutes its
    own gathered rows here (see :mod:`common.privacy.dpsgd`).
    """
    rows = {name: getattr(model, name)(users) for name in model.user_tables}
    rows.update({name: getattr(model, name)(items) for name in model.item_tables})
    rows.update(feature_rows(model, items))
    return rows


def l2_rows(model: Recommender, rows: dict[str, Tensor]) -> Tensor:
    """Per-sample (B,) squared norm of the embedding rows in ``rows``."""
    total = torch.zeros(())
    for name in model.l2_tables:
        r = rows[name]
        total = total + r.pow(2).sum(tuple(range(1, r.dim())))
    return total


# Every model's shared item tables (their rows are the catalogue).
ITEM_TABLES: tuple[str, ...] = MF.item_tables + NeuMF.item_tables


def build_model(
    name: ModelName,
    num_users: int,
    num_items: int,
    dim: int,
    mlp_layers: Sequence[int] = (64, 32, 16),
    item_text: Tensor | None = None,
) -> Recommender:
    """Build a recommender by name (``hybrid-mf`` needs the catalogue's ``item_text`` (I, D))."""
    if name == "mf":
        return MF(num_users, num_items, dim)
    if name == "neumf":
        return NeuMF(num_users, num_items, dim, mlp_layers)
    if name == "hybrid-mf":
        if item_text is None:
            raise ValueError("model 'hybrid-mf' needs the items' text embeddings (item_text)")
        return HybridMF(num_users, num_items, dim, item_text)
    raise ValueError(f"unknown model {name!r}; use 'mf', 'neumf' or 'hybrid-mf'")


def is_private(name: str) -> bool:
    """Whether the parameter ``name`` belongs to a silo's users (never shared)."""
    return name.startswith(PRIVATE_PREFIX)


def shared_state(model: nn.Module) -> dict[str, Tensor]:
    """The shared parameters (detached copies on CPU), keyed by name."""
    return {
        k: v.detach().cpu().clone()
        for k, v in model.state_dict().items()
        if not is_private(k)
    }


def private_state(model: nn.Module) -> dict[str, Tensor]:
    """The private (per-user) parameters (detached copies on CPU), keyed by name."""
    return {
        k: v.detach().cpu().clone() for k, v in model.state_dict().items() if is_private(k)
    }


def load_partial_state(model: nn.Module, state: dict[str, Tensor], *, private: bool) -> None:
    """Load exactly the shared (``private=False``) or private parameters into ``model``.

    Raises
    ------
    ValueError
        If ``state`` lacks a key of that part, has an extra key, or a shape differs.
    """
    expected = {k: v for k, v in model.state_dict().items() if is_private(k) == private}
    part = "private" if private else "shared"
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{part} parameters mismatch: missing {missing}, unexpected {extra}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(
                f"{part} parameter {k!r} has shape {tuple(v.shape)}, "
                f"model expects {tuple(expected[k].shape)}"
            )
    model.load_state_dict(state, strict=False)
