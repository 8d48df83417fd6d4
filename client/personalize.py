"""A silo's personalized model: fine-tuned on its own users, kept on the node, never sent.

:func:`evaluate` runs when the silo evaluates a round with ``personalize.enabled``:
it fine-tunes a copy of the silo's model (:func:`common.personalization.fine_tune`),
keeps that copy in node state (and, with a durable store, in
``<state dir>/personalized.npz``) and returns the copy's evaluation sums under the
``personalized-`` prefix. :func:`personalized_model` gives a recommender the copy.
Nothing here builds a reply: the caller adds the returned sums to its evaluation
reply next to the global model's, and they are released like those.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, RecordDict

from client import silo
from common import records
from common.config import AppConfig
from common.data.silo import SiloData
from common.evaluation import PERSONALIZED, SumValue
from common.models import Recommender
from common.personalization import fine_tune
from common.seeding import numpy_rng
from common.storage import save_arrays

#: File of the personalized model in a silo's state directory.
PERSONALIZED_FILE = "personalized.npz"


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

    ``model`` (the global shared part and the users' rows) is not modified.
    """
    rng = numpy_rng(cfg.seed, "personalize", partition_id, server_round)
    result = fine_tune(
        model, data.split, cfg.personalize, cfg.train, k=cfg.eval.k, rng=rng, device=silo.device()
    )
    tuned = result.model.cpu()
    arrays = ArrayRecord(torch_state_dict={k: v.detach().clone() for k, v in tuned.state_dict().items()})
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
    model.load_state_dict(dict(stored))
    return True
