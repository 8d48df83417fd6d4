"""Item content into models: the catalogue's text embeddings (``hybrid-mf``) and pretrained item tables.

Silos, the server and the centralized baseline build their model through
:func:`model_for`, so all of them give ``hybrid-mf`` the same fixed text
embeddings (computed once per process, cached on disk by
:mod:`common.data.text_embeddings`), and the server starts the shared item table
from ``model.item-init`` when it is set (:func:`apply_item_init`): a ``.npy`` table, or
``"content"``, the principal components of the catalogue's text embeddings.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from common.config import AppConfig, DataSettings, ItemSettings
from common.data import prepared
from common.data.items import catalogue_texts, read_items_file, read_movielens_catalogue, read_movielens_items
from common.data.pipeline import load_interactions
from common.errors import ConfigError, DataError
from common.models import Recommender, build_model

logger = logging.getLogger("fedrec.content")


def item_texts(items: ItemSettings, data: DataSettings, path: str = "") -> dict[str, str]:
    """Item id -> text from ``items.path``, else from the MovieLens item file beside the ratings."""
    if items.path:
        return read_items_file(Path(items.path), items.id_col, items.text_cols)
    return read_movielens_items(data.dataset, Path(path or data.path))


@functools.lru_cache(maxsize=4)
def _catalogue_embeddings(items: ItemSettings, data: DataSettings, seed: int, path: str) -> NDArray[np.float32]:
    from common.data.text_embeddings import encode_texts

    where = Path(path or data.path)
    if where.is_dir() and (prepared.is_prepared_silo(where) or prepared.catalogue_size(where) is not None):
        raise DataError(
            f"model.name: hybrid-mf needs the catalogue's item ids to match item texts, and prepared silo "
            f"data ({where}) keeps only indices; run it on the raw data set (data.path = the log)"
        )
    catalogue = load_interactions(data, seed, path)
    texts, missing = catalogue_texts(catalogue.item_ids, item_texts(items, data, path))
    if missing == len(texts):
        raise DataError(
            f"items: none of the {len(texts)} catalogue items of {catalogue.source} has a text in "
            f"{items.path or 'the MovieLens item file'}; do the item ids match ({items.id_col!r})?"
        )
    if missing:
        logger.warning("items: %d of %d catalogue items have no text (embedded as empty)", missing, len(texts))
    cache = Path(items.cache_dir).expanduser() if items.cache_dir else None
    return encode_texts(texts, items.encoder, cache_dir=cache, device=items.device).embeddings


def catalogue_text_embeddings(cfg: AppConfig, num_items: int, path: str = "") -> torch.Tensor:
    """Fixed text embeddings (num_items, D) of the catalogue; items beyond it (canaries) get zeros."""
    emb = torch.from_numpy(_catalogue_embeddings(cfg.items, cfg.data, cfg.seed, path))
    if len(emb) > num_items:
        raise DataError(f"items: the catalogue has {len(emb)} texts but the model {num_items} items")
    if len(emb) < num_items:
        emb = torch.cat([emb, torch.zeros(num_items - len(emb), emb.shape[1])])
    return emb


def model_for(cfg: AppConfig, num_users: int, num_items: int, path: str = "") -> Recommender:
    """``build_model`` for ``cfg.model``, with the text embeddings when it is ``hybrid-mf``."""
    text = catalogue_text_embeddings(cfg, num_items, path) if cfg.model.name == "hybrid-mf" else None
    return build_model(cfg.model.name, num_users, num_items, cfg.model.dim, cfg.model.mlp_layers, item_text=text)


def load_item_init(path: str, num_items: int, dim: int) -> torch.Tensor:
    """The ``model.item-init`` table: a ``.npy`` array of shape (num_items, dim), finite.

    Raises
    ------
    ConfigError
        If the file is missing or unreadable, or its shape or values are wrong.
    """
    file = Path(path).expanduser()
    if file.suffix != ".npy":
        raise ConfigError(f"model.item-init: {file}: expected a .npy file of shape ({num_items}, {dim})")
    try:
        table = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.item-init: {file}: cannot be read ({exc})") from exc
    if table.shape != (num_items, dim):
        raise ConfigError(
            f"model.item-init: {file} has shape {table.shape}, the model's item table is ({num_items}, {dim}) "
            "(num-items of the catalogue, model.dim)"
        )
    if not np.issubdtype(table.dtype, np.floating) or not np.isfinite(table).all():
        raise ConfigError(f"model.item-init: {file}: values must be finite floats (dtype {table.dtype})")
    return torch.from_numpy(table.astype(np.float32))


CONTENT_INIT = "content"  # model.item-init: the item table from the catalogue's text embeddings

#: Release-year bins of the content table's year block, in years before the catalogue's newest
#: release: [0, 2), [2, 3), [3, 5), [5, 9), [9, 19), [19, 29), [29, 39), [39, ∞) — finer for recent
#: releases, whose age a user's taste separates most finely (chosen on ML-100K validation).
AGE_EDGES = (2.0, 3.0, 5.0, 9.0, 19.0, 29.0, 39.0)
MAX_AGE = 78.0  # the year block's numeric age column stops here (−min(age, 78) / 10)


def genre_block(genres: Sequence[Sequence[str]]) -> NDArray[np.float64]:
    """One 0/1 column per genre of the catalogue (sorted by name); an item without genres is all 0."""
    names = sorted({g for item in genres for g in item})
    column = {g: j for j, g in enumerate(names)}
    block = np.zeros((len(genres), len(names)))
    for i, item in enumerate(genres):
        block[i, [column[g] for g in item]] = 1.0
    return block


def year_block(years: NDArray[np.float64]) -> NDArray[np.float64]:
    """Release years as a numeric age column and a one-hot of :data:`AGE_EDGES`; unknown (NaN) years: the median.

    Age is counted from the catalogue's newest known release, so the block describes the
    catalogue, not the calendar.
    """
    known = years[np.isfinite(years)]
    if known.size == 0:
        raise DataError("model.item-init-year-weight: no item of the catalogue has a release year")
    age = known.max() - np.where(np.isfinite(years), years, np.median(known))
    bins = np.searchsorted(np.asarray(AGE_EDGES), age, side="right")
    return np.column_stack([-np.minimum(age, MAX_AGE) / 10.0, np.eye(len(AGE_EDGES) + 1)[bins]])


def content_item_table(
    embeddings: torch.Tensor, dim: int, std: float, blocks: Sequence[tuple[NDArray[np.float64], float]] = ()
) -> torch.Tensor:
    """The top ``dim`` principal components of the item text embeddings, as a (items, dim) table of std ``std``.

    Centred over the catalogue; the table's scores are each item's coordinates on the
    embeddings' principal axes (float64 SVD; components beyond the embeddings' rank are 0),
    scaled so the whole table has standard deviation ``std``. Only public catalogue content
    goes in, so it costs no privacy. Items without a text (zero rows) get the centred mean's
    coordinates like any other.

    ``blocks``: further public item features (``(items, F)`` arrays, e.g. :func:`genre_block`,
    :func:`year_block`) with a weight each, joined to the embeddings before the components
    are taken. Every block, the embeddings included, is first divided by its columns' mean
    standard deviation, so a weight says how much one of its columns counts against one
    embedding column (weight 0: the block is left out).
    """
    x = embeddings.double().numpy()
    parts = [(x, 1.0)]
    for block, weight in blocks:
        if block.shape[0] != x.shape[0]:
            raise DataError(f"model.item-init: a content block has {block.shape[0]} rows, the catalogue {x.shape[0]}")
        if weight > 0:
            if not block.std(0).mean() > 0:
                raise DataError("model.item-init: a content block is the same for every item (no content to use)")
            parts.append((block, weight))
    spreads = [float(part.std(0).mean()) or 1.0 for part, _ in parts]  # all-equal embeddings: refused below
    z = torch.from_numpy(np.concatenate([w * part / sd for (part, w), sd in zip(parts, spreads, strict=True)], axis=1))
    z = z - z.mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(z, full_matrices=False)
    k = min(dim, s.numel())
    table = torch.zeros(z.shape[0], dim, dtype=torch.float64)
    table[:, :k] = u[:, :k] * s[:k]
    spread = float(table.std())
    if not spread > 0:
        raise DataError("model.item-init = content: the catalogue's text embeddings are all equal (no content to use)")
    return (table * (std / spread)).float()


def metadata_blocks(cfg: AppConfig, num_items: int) -> list[tuple[NDArray[np.float64], float]]:
    """The content table's genre and release-year blocks with their weights (``model.item-init-*-weight``).

    Read from the MovieLens item file beside the ratings and aligned with the catalogue's item
    index; items beyond the catalogue (canaries) get no genre and the median year. Only the
    blocks of weight > 0 (empty when both are 0).
    """
    genre_weight, year_weight = cfg.model.item_init_genre_weight, cfg.model.item_init_year_weight
    if genre_weight == 0 and year_weight == 0:
        return []
    meta = read_movielens_catalogue(cfg.data.dataset, Path(cfg.data.path))
    row = {str(i): k for k, i in enumerate(meta.item_ids.tolist())}
    ids = [str(i) for i in load_interactions(cfg.data, cfg.seed).item_ids]
    at = [row.get(i) for i in ids] + [None] * (num_items - len(ids))
    genres = [meta.genres[k] if k is not None else [] for k in at]
    years = np.array([meta.years[k] if k is not None else np.nan for k in at])
    blocks = [(genre_block(genres), genre_weight)] if genre_weight > 0 else []
    return blocks + ([(year_block(years), year_weight)] if year_weight > 0 else [])


def apply_item_init(cfg: AppConfig, model: Recommender) -> None:
    """Overwrite the first item table (MF/hybrid ``item_embedding``, NeuMF ``item_gmf``) from ``model.item-init``."""
    if not cfg.model.item_init:
        return
    table = getattr(model, model.item_tables[0])
    if cfg.model.item_init == CONTENT_INIT:
        text = catalogue_text_embeddings(cfg, table.num_embeddings)
        init = content_item_table(text, table.embedding_dim, cfg.model.item_init_std, metadata_blocks(cfg, len(text)))
    else:
        init = load_item_init(cfg.model.item_init, table.num_embeddings, table.embedding_dim)
    with torch.no_grad():
        table.weight.copy_(init)
