"""The privacy vocabulary: one DP mechanism use, and one release of its output.

A :class:`PrivacyRelease` is what a silo (or the server) reports about one round:
the mechanism it used (Poisson-subsampled Gaussian: σ, q, steps, C over N units),
the ε it has spent so far at δ, or that it declined the round because of its
budget. The same object is the silo's ledger event, the privacy record of its
reply, the round's privacy entry in ``metrics.jsonl`` and the row of every report;
:meth:`PrivacyRelease.to_json` / :meth:`PrivacyRelease.from_json` are its only
serialisation. This module imports no accountant: it is pure data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

MECHANISM: Final = "poisson-subsampled-gaussian"
SAMPLING: Final = "poisson"
# At q = 1 every unit is in every step: the mechanism is the plain Gaussian, nothing is sampled.
FULL_MECHANISM: Final = "gaussian"
FULL_SAMPLING: Final = "none"


def mechanism_of(sample_rate: float) -> tuple[str, str]:
    """The ledger's ``(mechanism, sampling)`` words for a Gaussian step at sample rate q.

    q < 1: the Poisson-subsampled Gaussian (each unit in each step with probability q);
    q = 1: the Gaussian mechanism over every unit. The accounting is the same function of
    (σ, q) either way; only the description differs.
    """
    return (MECHANISM, SAMPLING) if sample_rate < 1.0 else (FULL_MECHANISM, FULL_SAMPLING)

# Event kinds.
DP_SGD: Final = "dp-sgd"  # a silo's local DP-SGD round
BUDGET_DECLINE: Final = "budget-decline"  # a silo declined a round: it would exceed its budget
DP_FEDAVG: Final = "dp-fedavg"  # the server's client-level DP aggregation
DP_EVALUATION: Final = "dp-evaluation"  # a silo's noisy evaluation sums (Gaussian, q = 1, one step)
# privacy.mode = distributed (common.privacy.distributed): one round of user-level DP-FedAvg over the
# union of all silos' users through the secure sum, and the DP item-popularity histogram (q = 1).
DISTRIBUTED_FEDAVG: Final = "distributed-dp-fedavg"
DISTRIBUTED_HISTOGRAM: Final = "distributed-dp-histogram"
# privacy.distributed.algorithm = "als": one round of DP alternating least squares (the same
# Gaussian mechanism over the union; what it releases are the users' bounded ALS statistics).
DISTRIBUTED_ALS: Final = "distributed-dp-als"
DISTRIBUTED_KINDS: Final = (DISTRIBUTED_FEDAVG, DISTRIBUTED_ALS, DISTRIBUTED_HISTOGRAM)
MECHANISM_KINDS: Final = (DP_SGD, DP_FEDAVG, DP_EVALUATION, *DISTRIBUTED_KINDS)
RELEASE_KINDS: Final = (DP_SGD, BUDGET_DECLINE, DP_FEDAVG, DP_EVALUATION, *DISTRIBUTED_KINDS)

SERVER_OWNER: Final = "server"

# The neighbouring relation: "zero-out" (dp-accounting's REPLACE_SPECIAL). A neighbouring
# data set replaces one unit's data with nothing; the roster of N units stays, so N is
# public and the same for both. For the Poisson-subsampled Gaussian its ε equals that
# of add/remove; replace-one (any data for any data) is two zero-outs.
RELATION: Final = "zero-out"
# What one neighbouring data set differs by, per privacy unit.
NEIGHBOURING: Final = {
    "user": "replace one user's interactions (in one silo) with none; the silo's roster of N users is public",
    "interaction": "replace one interaction (user, item) of one silo with a null record; its N slots are public",
    "client": "replace one silo's entire contribution with none (a zero update); the roster of N silos is public",
}

# Distributed DP: the server accounts for one population, the union of every silo's users.
UNION_NEIGHBOURING: Final = (
    "replace one user's interactions (in any silo) with none; the union roster of N users of all silos is public"
)

# Ledger envelope keys and constant descriptors that are not fields of a release.
_NOT_FIELDS = frozenset(
    {"format", "seq", "prev", "time", "versions", "mechanism", "sampling", "relation", "neighbouring"}
)


class ReleaseError(ValueError):
    """A privacy record does not describe a valid release (names the field)."""


def silo_owner(partition_id: int) -> str:
    """Owner name of silo ``partition_id`` (its ledger's and its releases')."""
    return f"silo-{partition_id}"


def partition_of(owner: str) -> int | None:
    """The partition id of a ``silo-<k>`` owner, None for the server."""
    if owner.startswith("silo-") and owner[5:].isdigit():
        return int(owner[5:])
    return None


@dataclass(frozen=True, slots=True)
class MechanismUse:
    """``steps`` compositions of a Poisson-subsampled Gaussian mechanism.

    ``noise_multiplier`` is σ (noise std / clip norm); ``sample_rate`` is the
    probability q with which each privacy unit enters a step. σ = 0 means no noise
    (ε = ∞); ``steps`` = 0 is allowed (a round that took no step).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


@dataclass(frozen=True, slots=True)
class PrivacyRelease:
    """One round's privacy event of one owner (a silo or the server).

    ``epsilon`` is the owner's ε at ``delta`` after this event, composed over every
    step so far with ``accountant``; ``steps`` are this round's steps (0 for a
    decline). The mechanism fields are the owner's fixed mechanism for the run.
    """

    owner: str
    server_round: int
    kind: str
    unit: str
    accountant: str
    delta: float
    delta_rule: str
    epsilon: float
    target_epsilon: float
    noise_multiplier: float
    sample_rate: float
    clip: float
    population: int
    steps: int
    total_steps: int
    rounds_trained: int
    released: str
    epsilon_if_trained: float | None = None  # declines: ε had the owner trained
    expected_batch_size: int | None = None  # local DP: expected units per step

    def __post_init__(self) -> None:
        if self.kind not in RELEASE_KINDS:
            raise ReleaseError(f"kind: expected one of {', '.join(RELEASE_KINDS)}, got {self.kind!r}")
        if self.unit not in NEIGHBOURING:
            raise ReleaseError(f"unit: expected one of {', '.join(NEIGHBOURING)}, got {self.unit!r}")
        if not 0.0 < self.delta < 1.0:
            raise ReleaseError(f"delta: must be in (0, 1), got {self.delta!r}")
        if not (self.epsilon >= 0.0):
            raise ReleaseError(f"epsilon: must be >= 0, got {self.epsilon!r}")
        if self.population < 1:
            raise ReleaseError(f"population: must be >= 1, got {self.population!r}")
        if self.steps < 0 or self.total_steps < self.steps:
            raise ReleaseError(f"steps: {self.steps} this round, {self.total_steps} in all is impossible")
        if self.kind == BUDGET_DECLINE and self.steps:
            raise ReleaseError("steps: a declined round takes no step")

    # ------------------------------------------------------------ derived
    @property
    def trained(self) -> bool:
        """False for a budget decline."""
        return self.kind != BUDGET_DECLINE

    @property
    def partition_id(self) -> int | None:
        """The silo's partition id (None for the server)."""
        return partition_of(self.owner)

    @property
    def neighbouring(self) -> str:
        """The neighbouring relation of the unit (the union of silos' users under distributed DP).

        The server's user-level releases and every silo's own view of a distributed-DP release
        (``distributed-dp-*``: the union's mechanism over N_total) name the union roster.
        """
        if self.unit == "user" and (
            self.owner == SERVER_OWNER or self.kind in DISTRIBUTED_KINDS
        ):
            return UNION_NEIGHBOURING
        return NEIGHBOURING[self.unit]

    @property
    def use(self) -> MechanismUse | None:
        """This round's mechanism use (None for a decline)."""
        if not self.trained:
            return None
        return MechanismUse(self.noise_multiplier, self.sample_rate, self.steps)

    # ------------------------------------------------------------ serialisation
    def to_json(self) -> dict[str, Any]:
        """The one serialised form: ledger event fields, reply record, metrics entry.

        ``None`` fields are left out (Flower's records cannot hold None).
        """
        out: dict[str, Any] = {
            "owner": self.owner,
            "round": self.server_round,
            "kind": self.kind,
            "unit": self.unit,
            "relation": RELATION,
            "neighbouring": self.neighbouring,
            "accountant": self.accountant,
            "delta": self.delta,
            "delta-rule": self.delta_rule,
            "epsilon": self.epsilon,
            "target-epsilon": self.target_epsilon,
            "mechanism": mechanism_of(self.sample_rate)[0],
            "sampling": mechanism_of(self.sample_rate)[1],
            "noise-multiplier": self.noise_multiplier,
            "sample-rate": self.sample_rate,
            "clip": self.clip,
            "population": self.population,
            "steps": self.steps,
            "total-steps": self.total_steps,
            "rounds-trained": self.rounds_trained,
            "released": self.released,
        }
        if self.epsilon_if_trained is not None:
            out["epsilon-if-trained"] = self.epsilon_if_trained
        if self.expected_batch_size is not None:
            out["expected-batch-size"] = self.expected_batch_size
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PrivacyRelease:
        """Inverse of :meth:`to_json`; also reads a ledger event (envelope keys ignored).

        Raises
        ------
        ReleaseError
            Naming the field that is missing, of the wrong type or out of range, or
            the first unknown field.
        """
        unknown = sorted(set(data) - _FIELDS - _NOT_FIELDS)
        if unknown:
            raise ReleaseError(f"{unknown[0]}: not a field of a privacy release")
        r = _Fields(data)
        return cls(
            owner=r.str("owner"),
            server_round=r.int("round"),
            kind=r.str("kind"),
            unit=r.str("unit"),
            accountant=r.str("accountant"),
            delta=r.float("delta"),
            delta_rule=r.str("delta-rule"),
            epsilon=r.float("epsilon", allow_inf=True),
            target_epsilon=r.float("target-epsilon"),
            noise_multiplier=r.float("noise-multiplier"),
            sample_rate=r.float("sample-rate"),
            clip=r.float("clip"),
            population=r.int("population"),
            steps=r.int("steps"),
            total_steps=r.int("total-steps"),
            rounds_trained=r.int("rounds-trained"),
            released=r.str("released"),
            epsilon_if_trained=r.float("epsilon-if-trained", allow_inf=True) if "epsilon-if-trained" in data else None,
            expected_batch_size=r.int("expected-batch-size") if "expected-batch-size" in data else None,
        )


_FIELDS = frozenset(
    {
        "owner", "round", "kind", "unit", "accountant", "delta", "delta-rule", "epsilon",
        "target-epsilon", "noise-multiplier", "sample-rate", "clip", "population", "steps",
        "total-steps", "rounds-trained", "released", "epsilon-if-trained", "expected-batch-size",
    }
)


class _Fields:
    """Typed access to a release's JSON fields; errors name the field."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    def _get(self, key: str) -> Any:
        if key not in self._data:
            raise ReleaseError(f"{key}: missing")
        return self._data[key]

    def str(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise ReleaseError(f"{key}: expected a string, got {value!r}")
        return value

    def int(self, key: str) -> int:  # type: ignore[valid-type]
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ReleaseError(f"{key}: expected an integer, got {value!r}")
        return value

    def float(self, key: str, *, allow_inf: bool = False) -> float:  # type: ignore[valid-type]
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ReleaseError(f"{key}: expected a number, got {value!r}")
        number = float(value)
        if math.isnan(number) or (math.isinf(number) and not allow_inf):
            raise ReleaseError(f"{key}: must be finite, got {value!r}")
        return number
