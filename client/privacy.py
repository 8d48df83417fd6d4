"""A silo's local differential privacy: its accountant, budget and DP-SGD round.

The accountant is the silo's *history* of mechanism uses (one entry per round it
trained), kept in node state (``context.state``) between ClientApp calls; ε is
always recomputed by composing every step of every entry, so it never resets
when the ClientApp is rebuilt. Nothing in this history leaves the silo except the
per-round summary each reply carries (ε so far, δ, unit, σ, q, steps).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from common import records
from common.config import AppConfig
from common.data.split import UserSplit
from common.models import Recommender
from common.privacy.accounting import (
    MechanismUse,
    calibrate_noise,
    default_delta,
    epsilon,
    would_exceed,
)
from common.privacy.ledger import MECHANISM, NEIGHBOURING, Chain, silo_owner
from common.privacy.local import LocalDPSettings, UnitSampler, dp_train, steps_per_round
from common.training import TrainStats


@dataclass(slots=True)
class SiloAccountant:
    """Mechanism parameters fixed for the run, and every use so far."""

    unit: str
    population: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    delta: float
    accountant: str
    rounds: list[int] = field(default_factory=list)
    uses: list[MechanismUse] = field(default_factory=list)

    def epsilon(self) -> float:
        """ε at δ over every step taken so far (the accountant of record)."""
        return epsilon(self.uses, self.delta, self.accountant)  # type: ignore[arg-type]

    def planned(self) -> MechanismUse:
        """The mechanism use of one more round."""
        return MechanismUse(self.noise_multiplier, self.sample_rate, self.steps_per_round)

    def to_record(self) -> ConfigRecord:
        """Node-state form (also what a silo could write to disk)."""
        return ConfigRecord(
            {
                "unit": self.unit,
                "population": self.population,
                "sample-rate": self.sample_rate,
                "steps-per-round": self.steps_per_round,
                "noise-multiplier": self.noise_multiplier,
                "delta": self.delta,
                "accountant": self.accountant,
                "rounds": list(self.rounds),
                "use-noise-multipliers": [u.noise_multiplier for u in self.uses],
                "use-sample-rates": [u.sample_rate for u in self.uses],
                "use-steps": [u.steps for u in self.uses],
            }
        )

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> SiloAccountant:
        """Inverse of :meth:`to_record`."""
        uses = [
            MechanismUse(float(s), float(q), int(n))
            for s, q, n in zip(
                rec["use-noise-multipliers"], rec["use-sample-rates"], rec["use-steps"], strict=True  # type: ignore[arg-type]
            )
        ]
        return cls(
            unit=str(rec["unit"]),
            population=int(rec["population"]),  # type: ignore[arg-type]
            sample_rate=float(rec["sample-rate"]),  # type: ignore[arg-type]
            steps_per_round=int(rec["steps-per-round"]),  # type: ignore[arg-type]
            noise_multiplier=float(rec["noise-multiplier"]),  # type: ignore[arg-type]
            delta=float(rec["delta"]),  # type: ignore[arg-type]
            accountant=str(rec["accountant"]),
            rounds=[int(r) for r in rec["rounds"]],  # type: ignore[union-attr]
            uses=uses,
        )


def new_accountant(cfg: AppConfig, split: UserSplit) -> SiloAccountant:
    """Fix the silo's mechanism for the run: q from its population, σ given or calibrated.

    A calibrated σ spends ``target-epsilon`` over ``num-server-rounds`` rounds of
    ``steps-per-round`` steps (the silo takes part in every round at most).
    """
    p = cfg.privacy.local
    sampler = UnitSampler(split, p.unit, p.batch_size, p.max_positives)
    steps = steps_per_round(sampler.sample_rate, cfg.train.local_epochs)
    delta = p.delta or default_delta(sampler.population)
    sigma = p.noise_multiplier or calibrate_noise(
        sampler.sample_rate, steps * cfg.num_server_rounds, p.target_epsilon, delta, cfg.privacy.accountant
    )
    return SiloAccountant(
        unit=p.unit,
        population=sampler.population,
        sample_rate=sampler.sample_rate,
        steps_per_round=steps,
        noise_multiplier=sigma,
        delta=delta,
        accountant=cfg.privacy.accountant,
    )


def load_accountant(state: RecordDict, cfg: AppConfig, split: UserSplit) -> SiloAccountant:
    """The silo's accountant from node state, created on first use."""
    if records.STATE_PRIVACY in state.config_records:
        return SiloAccountant.from_record(state.config_records[records.STATE_PRIVACY])
    acc = new_accountant(cfg, split)
    save_accountant(state, acc)
    return acc


def save_accountant(state: RecordDict, acc: SiloAccountant) -> None:
    """Keep the accountant in node state."""
    state[records.STATE_PRIVACY] = acc.to_record()


@dataclass(frozen=True, slots=True)
class PrivateRoundResult:
    """Outcome of one round under local DP."""

    trained: bool
    stats: TrainStats | None
    epsilon: float
    epsilon_if_trained: float  # ε had the silo (also) trained this round


def private_round(
    model: Recommender,
    cfg: AppConfig,
    split: UserSplit,
    acc: SiloAccountant,
    server_round: int,
    device: torch.device,
) -> PrivateRoundResult:
    """Train one round of DP-SGD unless it would take ε above the budget.

    The budget check runs *before* any step, so a silo never exceeds
    ``privacy.local.target-epsilon``. On success ``acc`` holds the new use.
    """
    p = cfg.privacy.local
    planned = acc.planned()
    if p.target_epsilon > 0:
        exceeds, eps_after = would_exceed(acc.uses, planned, acc.delta, p.target_epsilon, acc.accountant)
        if exceeds:
            return PrivateRoundResult(False, None, acc.epsilon(), eps_after)
    settings = LocalDPSettings(
        unit=p.unit,
        # audit.unsafe-disable-noise: a deliberately broken run (accounted as σ, trained
        # without noise) that the empirical audit must flag.
        noise_multiplier=0.0 if cfg.audit.unsafe_disable_noise else acc.noise_multiplier,
        clip=p.clip,
        lr=p.optimizer.lr,
        user_lr=p.optimizer.user_lr,
        expected_batch_size=p.batch_size,
        max_positives=p.max_positives,
        user_epochs=p.optimizer.user_epochs,
        negative_items=split.num_items - cfg.audit.canaries,
    )
    # Noise and sampling come from fresh OS entropy: a seed in the run config would
    # let anyone who knows it subtract the noise.
    generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    rng = np.random.default_rng(secrets.randbits(128))
    stats, use = dp_train(
        model, split, cfg.train, settings, steps=planned.steps, rng=rng, generator=generator, device=device
    )
    if cfg.audit.unsafe_disable_noise:
        use = planned  # the broken run's claim: what the accountant and ledger record
    acc.rounds.append(server_round)
    acc.uses.append(use)
    eps = acc.epsilon()
    return PrivateRoundResult(True, stats, eps, eps)


def reply_record(acc: SiloAccountant, result: PrivateRoundResult, partition_id: int, clip: float, target: float) -> ConfigRecord:
    """What the server learns about the silo's privacy this round."""
    return ConfigRecord(
        {
            "partition-id": partition_id,
            "unit": acc.unit,
            "trained": result.trained,
            "epsilon": result.epsilon,
            "epsilon-if-trained": result.epsilon_if_trained,
            "target-epsilon": target,
            "delta": acc.delta,
            "noise-multiplier": acc.noise_multiplier,
            "sample-rate": acc.sample_rate,
            "clip": clip,
            "round-steps": acc.steps_per_round if result.trained else 0,
            "total-steps": sum(u.steps for u in acc.uses),
            "rounds-trained": len(acc.rounds),
            "population": acc.population,
            "accountant": acc.accountant,
        }
    )



# ---------------------------------------------------------------- ledger
def load_ledger(state: RecordDict, partition_id: int) -> Chain:
    """The silo's ledger from node state (verified), empty on first use."""
    owner = silo_owner(partition_id)
    if records.STATE_LEDGER not in state.config_records:
        return Chain(owner)
    lines = state.config_records[records.STATE_LEDGER]["lines"]
    return Chain(owner, [str(x) for x in lines], source="node state")  # type: ignore[union-attr]


def save_ledger(state: RecordDict, chain: Chain) -> None:
    """Keep the ledger in node state."""
    state[records.STATE_LEDGER] = ConfigRecord({"lines": chain.lines})


def record_round(
    chain: Chain, acc: SiloAccountant, result: PrivateRoundResult, cfg: AppConfig, server_round: int
) -> str:
    """Append this round's event: the mechanism use, or the budget decline."""
    p = cfg.privacy.local
    common = {
        "unit": acc.unit,
        "neighbouring": NEIGHBOURING[acc.unit],
        "delta": acc.delta,
        "delta-rule": "configured" if p.delta else "1/N^1.1 for the silo's N units",
        "accountant": acc.accountant,
        "target-epsilon": p.target_epsilon,
        "epsilon": result.epsilon,
    }
    if not result.trained:
        return chain.append(
            "budget-decline", server_round, **common, **{"epsilon-if-trained": result.epsilon_if_trained}
        )
    use = acc.uses[-1]
    return chain.append(
        "dp-sgd",
        server_round,
        **common,
        mechanism=MECHANISM,
        sampling="poisson",
        **{
            "noise-multiplier": use.noise_multiplier,
            "sample-rate": use.sample_rate,
            "steps": use.steps,
            "clip": p.clip,
            "population": acc.population,
            "expected-batch-size": p.batch_size,
            "released": "shared model parameters after the round (item tables, score function)",
        },
    )


def ledger_record(chain: Chain, partition_id: int, held_by_server: int) -> ConfigRecord:
    """The lines the server does not hold yet (all of them if it says it holds more)."""
    start = held_by_server if 0 <= held_by_server <= len(chain) else 0
    return ConfigRecord(
        {
            "partition-id": partition_id,
            "first-seq": start,
            "lines": chain.lines[start:],
            "head": chain.head,
        }
    )
