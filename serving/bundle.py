"""The model bundle ``fedrec export`` writes: what a serving stack needs, readable without fedrec.

::

    manifest.json        format, model kind and dims, score function, run config,
                         data fingerprint, the silo's privacy statement, file list
    shared.safetensors   the shared model (float32), names as in fedrec's models
    users.safetensors    the silo's private user rows (float32), row r = users.json ids[r]
    seen.safetensors     items each user row interacted with (training and held-out): indptr (U+1,), items (int64)
    users.json           {"ids": [raw user id of row 0, ...]}
    items.json           {"ids": [raw item id of row 0, ...], "titles": [...] or null}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from common.storage import atomic_write_json
from serving import scoring
from serving.silo import ServedSilo, ServingError

FORMAT = "fedrec-bundle"
VERSION = 1
MANIFEST = "manifest.json"
SHARED, USERS, SEEN = "shared.safetensors", "users.safetensors", "seen.safetensors"
USER_IDS, ITEM_IDS = "users.json", "items.json"


def write_bundle(served: ServedSilo, out: Path) -> Path:
    """Write ``served`` as a bundle in ``out`` (new or empty); return the manifest's path."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ServingError(f"--out {out} exists and is not an empty directory; choose a new one")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in served.shared.items()}, str(out / SHARED))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in served.users.items()}, str(out / USERS))
    save_file(
        {"indptr": served.seen_indptr.astype(np.int64), "items": served.seen_items.astype(np.int64)}, str(out / SEEN)
    )
    atomic_write_json(out / USER_IDS, {"ids": [str(u) for u in served.user_ids]})
    atomic_write_json(out / ITEM_IDS, {"ids": [str(i) for i in served.item_ids], "titles": served.titles})
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"kind": served.kind, **scoring.dims(served.kind, served.shared), "num-users": len(served.user_ids)},
        "score": scoring.SCORE_FUNCTIONS[served.kind],
        "silo": served.silo,
        "num-silos": served.num_silos,
        "source": served.source,
        "data-fingerprint": {
            "sha256": served.fingerprint(),
            "of": "item ids (row order), the silo's user ids (row order), seen indptr and items (int64 LE)",
        },
        "personalized": served.personalized,
        "privacy": served.privacy,
        "train": served.train,
        "config": served.run_config,
        "files": {"shared": SHARED, "users": USERS, "seen": SEEN, "user-ids": USER_IDS, "item-ids": ITEM_IDS},
    }
    atomic_write_json(out / MANIFEST, manifest)
    return out / MANIFEST


def read_bundle(path: Path) -> ServedSilo:
    """The served silo in bundle directory ``path``."""
    manifest = _json(path / MANIFEST)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ServingError(
            f"{path / MANIFEST}: not a {FORMAT} version {VERSION} manifest "
            f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})"
        )
    for name in (SHARED, USERS, SEEN, USER_IDS, ITEM_IDS):
        if not (path / name).is_file():
            raise ServingError(f"{path / name} not found: the bundle is incomplete")
    try:
        shared, users, seen = (load_file(str(path / n)) for n in (SHARED, USERS, SEEN))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ServingError(f"{path}: unreadable safetensors file ({exc})") from None
    items = _json(path / ITEM_IDS)
    served = ServedSilo(
        kind=str(manifest["model"]["kind"]),
        shared=dict(shared),
        users=dict(users),
        user_ids=np.asarray(_json(path / USER_IDS)["ids"], dtype=object),
        item_ids=np.asarray(items["ids"], dtype=object),
        seen_indptr=seen["indptr"],
        seen_items=seen["items"],
        silo=int(manifest["silo"]),
        num_silos=int(manifest["num-silos"]),
        source=str(path),
        titles=items.get("titles"),
        run_config=dict(manifest.get("config", {})),
        privacy=dict(manifest.get("privacy", {})),
        train=dict(manifest.get("train", {})),
        personalized=bool(manifest.get("personalized", False)),
    )
    if served.fingerprint() != manifest["data-fingerprint"]["sha256"]:
        raise ServingError(f"{path}: the ids or seen items do not match the manifest's data fingerprint")
    return served


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ServingError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise ServingError(f"{path}: expected a JSON object")
    return data
