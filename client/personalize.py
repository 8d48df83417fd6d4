"""A silo's personalized model: fine-tuned on its own users, kept on the node, never sent.

:func:`evaluate` runs when the silo evaluates a round with ``personalize.enabled``:
it fine-tunes a copy of the silo's model (:func:`common.personalization.fine_tune`),
keeps that copy in node state (and, with a durable store, in
``<state dir>/personalized.npz``) and returns the copy's evaluation sums under the
``personalized-`` prefix. :func:`personalized_model` gives a recommender the copy.
Nothing here builds a reply: the caller adds the returned sums to its evaluation
reply next to the global model's, and they are released like those.

With ``personalize.method = "ditto"``, :func:`train` runs in every training round
before the silo's federated training: it trains the silo's personal model
(:func:`common.personalization.ditto_train`) on a copy of the model the silo
received, and keeps its parameters in node state (``fedrec.personal``) and, with a
state directory, in ``<state dir>/personal.npz``; :func:`evaluate` then keeps the
mix of that model and the global one chosen on validation
(:func:`common.personalization.ditto_select`). The federated training, and every
array the silo sends, are those of a run without personalization.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, RecordDict

from client import silo
from common import records
from common.config import AppConfig
from common.data.silo import SiloData
from common.evaluation import PERSONALIZED, SumValue
from common.models import Recommender
from common.personalization import ditto_select, ditto_train, fine_tune, recency_select
from common.recency import RECENCY_KEYS, RECENT_ITEMS_KEY, RECENT_WEIGHT_KEY
from common.seeding import numpy_rng
from common.storage import load_arrays, save_arrays

#: File of the personalized model in a silo's state directory.
PERSONALIZED_FILE = "personalized.npz"
#: File of the ditto personal model's parameters in a silo's state directory.
PERSONAL_FILE = "personal.npz"
#: Node-state key of the ditto personal model's parameters (never sent).
STATE_PERSONAL = "fedrec.personal"


def train(
    model: Recommender,
    cfg: AppConfig,
    data: SiloData,
    partition_id: int,
    server_round: int,
    state: RecordDict,
    state_dir: Path | None = None,
) -> None:
    """Train the silo's personal model one round (``method = "ditto"``) toward ``model``; keep it.

    ``model`` (the received shared parameters and the users' rows) is not modified, and
    torch's global random state is left as it was, so the federated training that
    follows is that of a run without personalization.
    """
    rng = numpy_rng(cfg.seed, "personal", partition_id, server_round)
    with torch.random.fork_rng(devices=[]):
        personal, _ = ditto_train(
            _personal(state, state_dir), model, data.split, cfg.personalize, cfg.train, rng=rng, device=silo.device()
        )
    arrays = ArrayRecord(torch_state_dict=personal)
    state[STATE_PERSONAL] = arrays
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        save_arrays(state_dir / PERSONAL_FILE, arrays)


def _personal(state: RecordDict, state_dir: Path | None) -> dict[str, torch.Tensor] | None:
    """The personal model's parameters from node state, else from the state directory; None before any."""
    if STATE_PERSONAL not in state.array_records and state_dir is not None and (state_dir / PERSONAL_FILE).exists():
        state[STATE_PERSONAL] = load_arrays(state_dir / PERSONAL_FILE)
    if STATE_PERSONAL not in state.array_records:
        return None
    return dict(state.array_records[STATE_PERSONAL].to_torch_state_dict())


def evaluate(
    model: Recommender,
    cfg: AppConfig,
    data: SiloData,
    partition_id: int,
    server_round: int,
    state: RecordDict,
    state_dir: Path | None = None,
) -> dict[str, SumValue]:
    """Fine-tune a copy of ``model`` on the silo's users; keep it; return its sums, prefixed.

    With ``method = "ditto"`` the copy is the mix of ``model`` and the silo's personal
    model kept on validation; with ``method = "recency"``, ``model`` with each user's
    row shifted toward the user's latest training items (m and β kept on validation).
    ``model`` (the global shared part and the users' rows) is not modified.
    """
    choice: dict[str, float] = {}
    if cfg.personalize.method == "ditto":
        personal = _personal(state, state_dir)
        tuned = ditto_select(model, personal, data.split, cfg.personalize, k=cfg.eval.k, device=silo.device()).model
    elif cfg.personalize.method == "recency":
        kept = recency_select(model, data.split, cfg.personalize, k=cfg.eval.k, device=silo.device())
        tuned = kept.model
        if kept.items:  # (m, β) beside the arrays: a user folded in later is shifted the same way
            choice = {RECENT_ITEMS_KEY: float(kept.items), RECENT_WEIGHT_KEY: kept.weight}
    else:
        rng = numpy_rng(cfg.seed, "personalize", partition_id, server_round)
        tuned = fine_tune(
            model, data.split, cfg.personalize, cfg.train, k=cfg.eval.k, rng=rng, device=silo.device()
        ).model
    tuned = tuned.cpu()
    kept_arrays = {k: v.detach().clone() for k, v in tuned.state_dict().items()}
    kept_arrays.update({key: torch.tensor([value]) for key, value in choice.items()})
    arrays = ArrayRecord(torch_state_dict=kept_arrays)
    state[records.STATE_PERSONALIZED] = arrays
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        save_arrays(state_dir / PERSONALIZED_FILE, arrays)
    sums = silo.evaluate_users(tuned, cfg, data)
    return {PERSONALIZED + key: value for key, value in sums.items()}


def personalized_model(state: RecordDict, model: Recommender) -> bool:
    """Load the silo's personalized parameters (if it has any) into ``model``; whether it did."""
    if records.STATE_PERSONALIZED not in state:
        return False
    stored = state.array_records[records.STATE_PERSONALIZED].to_torch_state_dict()
    model.load_state_dict({k: v for k, v in stored.items() if k not in RECENCY_KEYS})
    return True
