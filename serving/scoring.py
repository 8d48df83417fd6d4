"""Scores from plain arrays: the shared model and users' private rows, in numpy alone.

The same functions serve a run directory, a silo's state directory and an exported
bundle, so ``fedrec recommend`` and a script reading a bundle with ``safetensors`` and
numpy compute the same float32 numbers (docs/serving.md, "Score function").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.errors import FedrecError

Arrays = Mapping[str, NDArray[np.float32]]

MF_SHARED = ("item_embedding.weight", "item_bias.weight", "global_bias.value")
MF_PRIVATE = ("user_embedding.weight", "user_bias.weight")
NEUMF_PRIVATE = ("user_gmf.weight", "user_mlp.weight")
_MLP = re.compile(r"mlp\.(\d+)\.weight")

#: The score functions, as the bundle manifest states them (float32 throughout).
SCORE_FUNCTIONS = {
    "mf": "score(u, i) = (P[u] @ Q.T + bu[u]) + bi.T + b  with P = users:user_embedding.weight (U, D), "
    "bu = users:user_bias.weight (U, 1), Q = shared:item_embedding.weight (I, D), "
    "bi = shared:item_bias.weight (I, 1), b = shared:global_bias.value (1,)",
    "neumf": "score(u, i) = concat(Pg[u] * Qg[i], h) @ output.weight.T + output.bias, "
    "h = relu(... relu(concat(Pm[u], Qm[i]) @ mlp.0.weight.T + mlp.0.bias) ...) over mlp.<j>.weight/bias "
    "in increasing j; Pg, Pm = users:user_gmf.weight, users:user_mlp.weight; "
    "Qg, Qm = shared:item_gmf.weight, shared:item_mlp.weight",
}


class ModelError(FedrecError):
    """Model arrays that fedrec cannot score (unknown kind, missing or misshapen tables)."""


def model_kind(shared: Arrays, where: str) -> str:
    """``"mf"`` or ``"neumf"`` from the names of the shared arrays."""
    names = set(shared)
    if set(MF_SHARED) <= names and "item_gmf.weight" not in names:
        if "item_text_projection.weight" in names:
            raise ModelError(
                f"{where}: a hybrid-mf model (text item features): serve it from its run directory, "
                "which names the text the items were encoded from"
            )
        return "mf"
    if {"item_gmf.weight", "item_mlp.weight", "output.weight", "output.bias"} <= names:
        return "neumf"
    raise ModelError(f"{where}: not an mf or neumf shared model (arrays: {', '.join(sorted(names))})")


HYBRID_PROJECTION = "item_text_projection.weight"


def materialise_hybrid(shared: Arrays, item_text: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
    """A hybrid-mf model as MF: its item vectors ``q_i = e_i + W t_i`` in ``item_embedding.weight``.

    ``item_text`` (I, D_text) are the catalogue's fixed text embeddings the run trained
    with; the projection ``W`` is dropped, every other array kept. A model without a
    projection is returned unchanged.
    """
    if HYBRID_PROJECTION not in shared:
        return dict(shared)
    free, projection = shared["item_embedding.weight"], shared[HYBRID_PROJECTION]
    if item_text.shape != (free.shape[0], projection.shape[1]):
        raise ModelError(
            f"hybrid-mf: the text embeddings have shape {item_text.shape}, the model needs "
            f"({free.shape[0]}, {projection.shape[1]})"
        )
    out = {k: v for k, v in shared.items() if k != HYBRID_PROJECTION}
    out["item_embedding.weight"] = (free + item_text.astype(np.float32) @ projection.T).astype(np.float32)
    return out


def mlp_weights(shared: Arrays) -> list[tuple[NDArray[np.float32], NDArray[np.float32]]]:
    """The NeuMF tower's (W, b) layers in order."""
    indices = sorted(int(m.group(1)) for name in shared if (m := _MLP.fullmatch(name)))
    return [(shared[f"mlp.{j}.weight"], shared[f"mlp.{j}.bias"]) for j in indices]


def dims(kind: str, shared: Arrays) -> dict[str, Any]:
    """Model dimensions: items, embedding dim, NeuMF MLP widths."""
    if kind == "mf":
        q = shared["item_embedding.weight"]
        return {"num-items": int(q.shape[0]), "dim": int(q.shape[1])}
    layers = mlp_weights(shared)
    widths = [int(layers[0][0].shape[1]), *(int(w.shape[0]) for w, _ in layers)] if layers else []
    q = shared["item_gmf.weight"]
    return {"num-items": int(q.shape[0]), "dim": int(q.shape[1]), "mlp-layers": widths}


def private_names(kind: str) -> tuple[str, ...]:
    return MF_PRIVATE if kind == "mf" else NEUMF_PRIVATE


def check_rows(kind: str, shared: Arrays, users: Arrays, where: str) -> int:
    """Number of user rows; the private tables must fit the shared model."""
    need = private_names(kind)
    missing = [n for n in need if n not in users]
    if missing:
        raise ModelError(f"{where}: users' rows lack {', '.join(missing)} (a {kind} model)")
    n = len(users[need[0]])
    if kind == "mf":
        want = {MF_PRIVATE[0]: shared["item_embedding.weight"].shape[1], MF_PRIVATE[1]: 1}
    else:
        want = {
            NEUMF_PRIVATE[0]: shared["item_gmf.weight"].shape[1],
            NEUMF_PRIVATE[1]: shared["item_mlp.weight"].shape[1],
        }
    for name, width in want.items():
        arr = users[name]
        if arr.ndim != 2 or arr.shape != (n, width):
            raise ModelError(f"{where}: {name} has shape {arr.shape}, the shared model needs ({n}, {width})")
    return n


def score_mf(shared: Arrays, users: Arrays, rows: NDArray[np.int64]) -> NDArray[np.float32]:
    """MF scores (B, I) of user rows ``rows`` for every item."""
    p = users["user_embedding.weight"][rows]
    bu = users["user_bias.weight"][rows]
    q, bi, b = shared["item_embedding.weight"], shared["item_bias.weight"], shared["global_bias.value"]
    return (p @ q.T + bu) + bi.T + b


def score_neumf(shared: Arrays, users: Arrays, rows: NDArray[np.int64]) -> NDArray[np.float32]:
    """NeuMF scores (B, I) of user rows ``rows`` for every item."""
    pg, pm = users["user_gmf.weight"][rows], users["user_mlp.weight"][rows]
    qg, qm = shared["item_gmf.weight"], shared["item_mlp.weight"]
    out_w, out_b = shared["output.weight"], shared["output.bias"]
    result = np.empty((len(rows), len(qg)), dtype=np.float32)
    for r in range(len(rows)):
        h = np.concatenate([np.broadcast_to(pm[r], (len(qm), pm.shape[1])), qm], axis=1)
        for w, b in mlp_weights(shared):
            h = np.maximum(h @ w.T + b, 0)
        gmf = pg[r] * qg
        result[r] = (np.concatenate([gmf, h], axis=1) @ out_w.T + out_b)[:, 0]
    return result


def score(kind: str, shared: Arrays, users: Arrays, rows: NDArray[np.int64]) -> NDArray[np.float32]:
    """Scores (B, I) of user rows ``rows`` for every catalogue item."""
    rows = np.asarray(rows, dtype=np.int64)
    return score_mf(shared, users, rows) if kind == "mf" else score_neumf(shared, users, rows)


def top_k(scores: NDArray[np.float32], k: int, exclude: NDArray[np.int64]) -> NDArray[np.int64]:
    """Indices of the ``k`` best items of one score row, ``exclude`` left out (ties: lower index first)."""
    s = scores.astype(np.float64, copy=True)
    s[exclude] = -np.inf
    allowed = len(s) - len(np.unique(exclude))
    order = np.lexsort((np.arange(len(s)), -s))
    return order[: min(k, allowed)]
