"""Open what a finished run left for one silo: a run directory, a silo's state directory, a bundle.

* a simulation (or ``fedrec deploy local``) run directory: ``config.json``, ``final.npz``
  and the silos' durable state under ``silos/silo-<k>/<run-uid>/`` (or ``state-root``);
  the silo of a user is found by re-deriving the run's partition
  (:func:`common.data.pipeline.partition`);
* a ``fedrec centralized`` run directory: the same layout, one pooled "silo" 0;
* a silo's own state directory (``<state-dir>`` or ``<state-dir>/<run-uid>``, holding
  ``silo.json`` and ``user-params.npz``) plus the final shared model (``model``, else
  the ``final.npz`` of an enclosing run directory of the same run);
* a bundle written by ``fedrec export`` (:mod:`serving.bundle`).

A silo that ran with ``personalize.enabled`` keeps its personalized copy (the
shared model and its users' rows fine-tuned on its own users, never sent) in
``personalized.npz`` next to ``user-params.npz``; ``personalized`` chooses it
(``None``: the copy when the silo has one, ``True``: the copy or an error,
``False``: the global model and the rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.config import AppConfig, DataSettings, SyntheticSettings
from common.data import prepared
from common.data.pipeline import load_interactions, partition, split_interactions
from common.data.schema import Interactions
from common.data.split import NO_ITEM, UserSplit
from common.privacy.events import DP_FEDAVG, SERVER_OWNER, silo_owner
from common.privacy.ledger import LedgerError, read_ledger, releases
from common.privacy.statement import no_dp_sentence, run_releases, server_sentence, silo_sentence
from common.recency import RECENCY_KEYS
from common.run_config import with_defaults
from common.rundir import RunDir, RunDirError
from common.storage import load_arrays
from serving import scoring
from serving.silo import ServedSilo, ServingError, csr
from serving.titles import movielens_titles

USER_PARAMS = "user-params.npz"  # client.durable's names (serving never imports client)
SILO_INFO = "silo.json"
PERSONALIZED = "personalized.npz"  # client.personalize.PERSONALIZED_FILE
LEDGER = "ledger.jsonl"
POOLED = "pooled"  # silo.json of a centralized run: the rows are every user's, pooled


def open_source(
    path: Path,
    *,
    silo: int | None = None,
    model: Path | None = None,
    user: object | None = None,
    personalized: bool | None = None,
) -> ServedSilo:
    """The served silo at ``path`` (see the module docstring); ``user`` picks the silo of a run."""
    from serving import bundle

    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ServingError(f"{path} does not exist")
    try:
        if (path / bundle.MANIFEST).is_file():
            served = bundle.read_bundle(path)
            if personalized is not None and personalized != served.personalized:
                holds = "personalized copy" if served.personalized else "global model"
                flag = "--personalized" if personalized else "--global"
                raise ServingError(
                    f"{flag}: the bundle {path} holds the silo's {holds} only; export it again with {flag}"
                )
            return served
        if RunDir(path).config.is_file():
            return _from_run(RunDir(path), silo, user, personalized)
        info_dir = _state_dir(path)
        if info_dir is not None:
            return _from_state_dir(info_dir, model, personalized)
    except (OSError, ValueError, KeyError) as exc:
        raise ServingError(f"{path}: cannot read ({exc})") from None
    raise ServingError(
        f"{path} is not a fedrec run directory (config.json), a silo state directory (silo.json, "
        f"{USER_PARAMS}) or an exported bundle (manifest.json)"
    )


# ------------------------------------------------------------ run directories
def _from_run(run: RunDir, silo: int | None, user: object | None, personalized: bool | None) -> ServedSilo:
    try:
        saved = run.read_config()
    except RunDirError as exc:
        raise ServingError(str(exc)) from None
    if not run.final_model.is_file():
        raise ServingError(f"{run.final_model} not found: the run in {run.path} has not finished")
    cfg = AppConfig.from_run_config(with_defaults(saved.run_config))
    root = Path(cfg.state_root) if cfg.state_root else run.silo_states
    stores = _run_stores(root, saved.run_uid)
    if not stores:
        raise ServingError(
            f"no silo of the run in {run.path} kept its users' rows: {root}/silo-<k>/{saved.run_uid}/"
            f"{USER_PARAMS} not found (a run from before durable rows, or silos without a state directory)"
        )
    infos = {k: _read_info(p) for k, p in stores.items()}
    shared = _arrays(run.final_model)
    if any(info.get(POOLED) for info in infos.values()):
        store = stores[0]
        interactions = load_interactions(cfg.data, cfg.seed)
        split = split_interactions(cfg.data, cfg.seed, interactions).split
        if silo not in (None, 0):
            raise ServingError(f"--silo {silo}: {run.path} is a centralized run; its one silo is 0")
        return _served(
            shared,
            store,
            split,
            interactions,
            0,
            1,
            cfg,
            saved.run_config,
            _run_privacy(run, 0, cfg.privacy.mode),
            str(run.path),
            personalized,
        )
    num_silos = int(next(iter(infos.values()))["num-partitions"])
    interactions = load_interactions(cfg.data, cfg.seed)
    pooled = split_interactions(cfg.data, cfg.seed, interactions)
    parts = partition(cfg.data, cfg.seed, pooled, interactions, num_silos)
    if silo is None:
        silo = _silo_of(user, interactions, parts, run.path, sorted(stores))
    if not 0 <= silo < num_silos:
        raise ServingError(f"--silo {silo}: the run in {run.path} has silos 0..{num_silos - 1}")
    if silo not in stores:
        raise ServingError(
            f"silo {silo} of the run in {run.path} kept no rows: "
            f"{root / f'silo-{silo}' / saved.run_uid / USER_PARAMS} not found"
        )
    split = pooled.split.subset(parts[silo])
    return _served(
        shared,
        stores[silo],
        split,
        interactions,
        silo,
        num_silos,
        cfg,
        saved.run_config,
        _run_privacy(run, silo, cfg.privacy.mode),
        str(run.path),
        personalized,
    )


def _run_stores(root: Path, run_uid: str) -> dict[int, Path]:
    out: dict[int, Path] = {}
    if not root.is_dir():
        return out
    for child in root.iterdir():
        if child.name.startswith("silo-") and child.name[5:].isdigit() and (child / run_uid / USER_PARAMS).is_file():
            out[int(child.name[5:])] = child / run_uid
    return out


def _silo_of(
    user: object | None, interactions: Interactions, parts: list[NDArray[np.int64]], where: Path, kept: list[int]
) -> int:
    if user is None:
        if len(kept) == 1:
            return kept[0]
        raise ServingError(f"{where} holds {len(parts)} silos: name one (--silo K) or a user")
    matches = np.flatnonzero(interactions.user_ids == str(user))
    if len(matches) == 0:
        raise ServingError(f"user {str(user)!r} is not in the data of the run in {where} ({interactions.source})")
    index = int(matches[0])
    for k, users in enumerate(parts):
        if index in set(users.tolist()):
            return k
    raise ServingError(f"user {str(user)!r} of {where} is in no silo of its partition")  # pragma: no cover


def _run_privacy(run: RunDir, silo: int, mode: str) -> dict[str, Any]:
    by_owner, problems = run_releases(run)
    return _privacy(
        by_owner.get(silo_owner(silo), []), by_owner.get(SERVER_OWNER, []), mode, problems.get(silo_owner(silo)), silo
    )


def _privacy(silo_rels: list[Any], server_rels: list[Any], mode: str, problem: str | None, silo: int) -> dict[str, Any]:
    """The silo's privacy statement: its last local-DP release, the server's central DP, one sentence each."""
    out: dict[str, Any] = {"mode": mode}
    if problem is not None:
        out["problem"] = f"silo-{silo}'s ledger does not verify: {problem}"
    if silo_rels:
        last = silo_rels[-1]
        out["local"] = {
            "unit": last.unit,
            "epsilon": max(r.epsilon for r in silo_rels),
            "delta": last.delta,
            "accountant": last.accountant,
            "neighbouring": last.neighbouring,
            "rounds": last.rounds_trained,
            "statement": silo_sentence(silo_rels),
        }
    central = [r for r in server_rels if r.kind == DP_FEDAVG]
    if central:
        last = central[-1]
        out["central"] = {
            "unit": last.unit,
            "epsilon": max(r.epsilon for r in central),
            "delta": last.delta,
            "accountant": last.accountant,
            "neighbouring": last.neighbouring,
            "statement": server_sentence(central, silos_noised="local" in mode),
        }
    if "local" not in out and "central" not in out:
        out["statement"] = no_dp_sentence() if mode == "none" else f"privacy.mode = {mode} but no release was found"
    return out


# ------------------------------------------------------------ a silo's own state directory
def _state_dir(path: Path) -> Path | None:
    if (path / SILO_INFO).is_file():
        return path
    runs = [c for c in path.iterdir() if c.is_dir() and (c / SILO_INFO).is_file()] if path.is_dir() else []
    if len(runs) > 1:
        raise ServingError(
            f"{path} holds the state of {len(runs)} runs ({', '.join(sorted(c.name for c in runs))}); name one"
        )
    return runs[0] if runs else None


def _from_state_dir(store: Path, model: Path | None, personalized: bool | None) -> ServedSilo:
    info = _read_info(store)
    if not (store / USER_PARAMS).is_file():
        raise ServingError(f"{store / USER_PARAMS} not found: this silo never completed a training round")
    if model is None:
        model = _enclosing_final(store, str(info.get("run-uid", "")))
        if model is None:
            raise ServingError(f"{store}: pass the run's final shared model (--model final.npz)")
    model = Path(model).expanduser().resolve()
    if not model.is_file():
        raise ServingError(f"--model {model} does not exist")
    silo, num_silos = int(info["partition-id"]), int(info["num-partitions"])
    data_path = str(info.get("data-path") or "")
    settings = _data_settings(info)
    if data_path and Path(data_path).is_dir() and prepared.is_prepared_silo(Path(data_path)):
        d = Path(data_path)
        split = prepared.load_prepared_silo(d).split
        import pyarrow.parquet as pq

        user_ids = np.asarray(pq.read_table(d / prepared.USERS).column("user_id").to_pylist(), dtype=object)
        item_ids = np.asarray(pq.read_table(d / prepared.ITEMS).column("item_id").to_pylist(), dtype=object)
        # Prepared users are in silo row order; map them through a global index of their own.
        split = UserSplit(**{**_split_fields(split), "user_global_idx": np.arange(split.num_users)})
    else:
        seed = int(info["seed"])
        interactions = load_interactions(settings, seed, data_path)
        pooled = split_interactions(settings, seed, interactions)
        parts = partition(settings, seed, pooled, interactions, num_silos)
        split = pooled.split.subset(parts[silo])
        user_ids, item_ids = interactions.user_ids, interactions.item_ids
    rels, problem = [], None
    if (store / LEDGER).is_file():
        try:
            rels = releases(read_ledger(store / LEDGER, silo_owner(silo)))
        except LedgerError as exc:
            problem = str(exc)
    privacy = _privacy(rels, [], str(info.get("privacy-mode", "none")), problem, silo)
    shared = _arrays(model)
    train = dict(info["train"]) if "train" in info else _train_settings(None)
    titles = _titles(settings.dataset, settings.path or data_path, item_ids)
    shared, rows, used, recency = _personalized(shared, _arrays(store / USER_PARAMS), store, personalized)
    return _checked(
        shared,
        rows,
        split,
        user_ids,
        item_ids,
        silo,
        num_silos,
        str(store),
        titles,
        {"silo.json": info},
        privacy,
        {**train, **recency},
        used,
    )


def _enclosing_final(store: Path, run_uid: str) -> Path | None:
    for parent in list(store.parents)[:4]:
        run = RunDir(parent)
        if run.final_model.is_file() and run.config.is_file():
            try:
                if run.read_config().run_uid == run_uid:
                    return run.final_model
            except RunDirError:
                continue
    return None


def _data_settings(info: dict[str, Any]) -> DataSettings:
    data = dict(info["data"])
    return DataSettings(**{**data, "synthetic": SyntheticSettings(**data["synthetic"])})


def _split_fields(split: UserSplit) -> dict[str, Any]:
    return {name: getattr(split, name) for name in UserSplit.__dataclass_fields__}


# ------------------------------------------------------------ shared helpers
def _served(
    shared: dict[str, Any],
    store: Path,
    split: UserSplit,
    interactions: Interactions,
    silo: int,
    num_silos: int,
    cfg: AppConfig,
    run_config: dict[str, Any],
    privacy: dict[str, Any],
    source: str,
    personalized: bool | None,
) -> ServedSilo:
    titles = _titles(cfg.data.dataset, cfg.data.path, interactions.item_ids)
    shared, rows, used, recency = _personalized(shared, _arrays(store / USER_PARAMS), store, personalized)
    if scoring.HYBRID_PROJECTION in shared:  # served as MF over its item vectors e_i + W t_i
        from common.content import catalogue_text_embeddings

        num_items = len(shared["item_embedding.weight"])
        text = catalogue_text_embeddings(cfg, num_items, cfg.data.path).numpy()
        shared = scoring.materialise_hybrid(shared, text)
    return _checked(
        shared,
        rows,
        split,
        interactions.user_ids,
        interactions.item_ids,
        silo,
        num_silos,
        source,
        titles,
        run_config,
        privacy,
        {**_train_settings(cfg), **recency},
        used,
    )


def known_interactions(split: UserSplit) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(user rows, item rows) of every interaction the silo holds: training and held-out.

    Serving leaves all of them out: the held-out items are each user's latest interactions,
    kept from training only so that the model could be evaluated.
    """
    rows = np.arange(split.num_users, dtype=np.int64)
    users, items = [split.train_user], [split.train_item]
    for held in (split.val_item, split.test_item):
        present = held != NO_ITEM
        users.append(rows[present])
        items.append(held[present])
    return np.concatenate(users).astype(np.int64), np.concatenate(items).astype(np.int64)


def _checked(
    shared: dict[str, Any],
    rows: dict[str, Any],
    split: UserSplit,
    user_ids: NDArray[np.object_],
    item_ids: NDArray[np.object_],
    silo: int,
    num_silos: int,
    source: str,
    titles: list[str] | None,
    run_config: dict[str, Any],
    privacy: dict[str, Any],
    train: dict[str, Any],
    personalized: bool = False,
) -> ServedSilo:
    kind = scoring.model_kind(shared, source)
    indptr, seen = csr(*known_interactions(split), split.num_users)
    return ServedSilo(
        kind=kind,
        shared=shared,
        users=rows,
        user_ids=np.asarray(user_ids, dtype=object)[split.user_global_idx],
        item_ids=np.asarray(item_ids, dtype=object),
        seen_indptr=indptr,
        seen_items=seen,
        silo=silo,
        num_silos=num_silos,
        source=source,
        titles=titles,
        run_config=dict(run_config),
        privacy=privacy,
        train=train,
        personalized=personalized,
    )


def _personalized(
    shared: dict[str, Any], rows: dict[str, Any], store: Path, choice: bool | None
) -> tuple[dict[str, Any], dict[str, Any], bool, dict[str, float]]:
    """The silo's personalized shared arrays and rows (``store``/personalized.npz) when chosen; whether used.

    The file holds the fine-tuned copy's whole state: every array named like a shared
    array replaces it, every array named like a user row replaces that row table. A recency
    copy's (m, β) beside them come back as the last value (fold-in settings; empty otherwise).
    """
    path = store / PERSONALIZED
    if choice is False or (choice is None and not path.is_file()):
        return shared, rows, False, {}
    if not path.is_file():
        raise ServingError(
            f"--personalized: {path} not found: this silo kept no personalized copy "
            "(a run without personalize.enabled); use --global"
        )
    copy = _arrays(path)
    recency = {key: float(copy[key].ravel()[0]) for key in RECENCY_KEYS if key in copy}
    missing = sorted(set(shared) - set(copy)) + sorted(set(rows) - set(copy))
    if missing:
        raise ServingError(f"{path}: not this run's personalized copy (no {', '.join(missing)})")
    for name, table in {**shared, **rows}.items():
        if copy[name].shape != table.shape:
            raise ServingError(
                f"{path}: {name} has shape {copy[name].shape}, the model {table.shape}: not this run's copy"
            )
    return {n: copy[n] for n in shared}, {n: copy[n] for n in rows}, True, recency


def _train_settings(cfg: AppConfig | None) -> dict[str, Any]:
    if cfg is None:
        cfg = AppConfig.from_run_config(with_defaults({}))
    return {"loss": cfg.train.loss, "l2": cfg.train.l2, "num-negatives": cfg.train.num_negatives}


def _titles(dataset: str, path: str, item_ids: NDArray[np.object_]) -> list[str] | None:
    found = movielens_titles(dataset, path)
    if found is None:
        return None
    return [found.get(str(i), "") for i in item_ids]


def _read_info(store: Path) -> dict[str, Any]:
    path = store / SILO_INFO
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ServingError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise ServingError(f"{path}: expected a JSON object")
    return data


def _arrays(path: Path) -> dict[str, Any]:
    try:
        record = load_arrays(path)
    except (OSError, ValueError) as exc:
        raise ServingError(f"{path}: unreadable model file ({exc})") from None
    return {name: np.asarray(record[name].numpy(), dtype=np.float32) for name in record}
