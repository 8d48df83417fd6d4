"""How secure-aggregation payloads travel in Flower records (shared by both drivers).

One message type, ``query.secagg`` (a ClientApp ``@app.query("secagg")`` handler),
carries every stage: the ConfigRecord :data:`RECORD` holds the stage name under
:data:`STAGE` and the stage's ints, bytes and lists; the masked vector of the
``collect`` reply travels in the ArrayRecord :data:`ARRAYS` (one uint32/uint64 array,
4 or 8 bytes per coordinate). ``query`` rather than ``train``: the silo's vector is
computed by its training handler before the protocol starts (see :mod:`client.secagg`),
so none of these messages trains anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.secagg.protocol import STAGES, SecAggError

MESSAGE_TYPE: Final = "query.secagg"
ACTION: Final = "secagg"
RECORD: Final = "secagg"
ARRAYS: Final = "secagg.arrays"
STAGE: Final = "stage"
_ARRAY_FIELDS: Final = ("masked",)


def encode(stage: str, payload: Mapping[str, Any]) -> RecordDict:
    """A stage payload as a RecordDict (arrays apart, everything else in one ConfigRecord)."""
    config = {STAGE: stage, **{k: v for k, v in payload.items() if k not in _ARRAY_FIELDS}}
    content = RecordDict({RECORD: ConfigRecord(config)})  # type: ignore[arg-type]
    arrays = {k: Array(np.ascontiguousarray(payload[k])) for k in _ARRAY_FIELDS if k in payload}
    if arrays:
        content[ARRAYS] = ArrayRecord(arrays)  # type: ignore[arg-type]
    return content


def decode(content: RecordDict, where: str) -> tuple[str, dict[str, Any]]:
    """(stage, payload) of a secure-aggregation message; errors name ``where`` it came from."""
    if RECORD not in content.config_records:
        raise SecAggError(f"{where}: no {RECORD!r} ConfigRecord in the message")
    payload: dict[str, Any] = dict(content.config_records[RECORD])
    stage = payload.pop(STAGE, None)
    if stage not in STAGES:
        raise SecAggError(f"{where}: stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if ARRAYS in content.array_records:
        for key, array in content.array_records[ARRAYS].items():
            payload[key] = array.numpy()
    return stage, payload
