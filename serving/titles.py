"""Item titles when the data has them: MovieLens ``u.item`` (ML-100K) or ``movies.dat`` (ML-1M)."""

from __future__ import annotations

from pathlib import Path


def movielens_titles(dataset: str, path: str) -> dict[str, str] | None:
    """Raw item id -> title, or None when the data set carries no titles (or the file is absent)."""
    if dataset not in ("ml-100k", "ml-1m") or not path:
        return None
    where = Path(path)
    directory = where if where.is_dir() else where.parent
    name, sep = ("u.item", "|") if dataset == "ml-100k" else ("movies.dat", "::")
    file = directory / name
    if not file.is_file():
        return None
    titles: dict[str, str] = {}
    for line in file.read_text(encoding="latin-1").splitlines():
        parts = line.split(sep)
        if len(parts) >= 2 and parts[0].strip():
            titles[parts[0].strip()] = parts[1].strip()
    return titles
