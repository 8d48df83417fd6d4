"""A silo's local differential privacy: its accountant, budget, ledger and DP-SGD round.

The accountant (:class:`common.privacy.accounting.Accountant`) is the silo's
mechanism for the run plus its *history* of uses, kept in node state
(``context.state``) between ClientApp calls; ε is always recomputed by composing
every step, so it never resets when the ClientApp is rebuilt. What leaves the silo
about its privacy is one :class:`~common.privacy.events.PrivacyRelease` per round
(also its ledger line).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.supercore import log

from common import records
from common.config import AppConfig
from common.data.split import UserSplit
from common.models import Recommender
from common.privacy import release
from common.privacy.accounting import Accountant, calibrate_noise, choose_delta, would_exceed
from common.privacy.calibration_cache import calibrated
from common.privacy.dpsgd import CsprngNormal, NoiseSource, TorchNormal
from common.privacy.events import MechanismUse, PrivacyRelease, silo_owner
from common.privacy.ledger import Chain
from common.privacy.local import LocalDPSettings, UnitSampler, dp_train, steps_per_round
from common.training import TrainStats

RELEASED = "shared model parameters after the round (item tables, score function)"


def new_accountant(cfg: AppConfig, split: UserSplit, partition_id: int) -> Accountant:
    """Fix the silo's mechanism for the run: q from its population, σ given or calibrated.

    A calibrated σ spends ``target-epsilon`` over ``num-server-rounds`` rounds of
    ``steps-per-round`` steps (the silo takes part in every round at most). δ is
    :func:`~common.privacy.accounting.choose_delta` of the silo's N units: a
    configured δ above 1/(10N) is logged as weak and so recorded in the release.

    Raises
    ------
    ConfigError
        If ``privacy.local.delta`` is ≥ 1/N for this silo (the message names the
        silo, N and 1/N). The ClientApp then replies with an error, which the server
        records as this silo's rejected reply; no state is saved.
    """
    p = cfg.privacy.local
    sampler = UnitSampler(split, p.unit, p.batch_size, p.max_positives)
    steps = steps_per_round(sampler.sample_rate, cfg.train.local_epochs)
    chosen = choose_delta(
        p.delta,
        sampler.population,
        key="privacy.local.delta",
        units=f"the silo's N {p.unit}s",
        owner=f"silo {partition_id}",
    )
    if chosen.warning:
        log(WARNING, "%s", chosen.warning)
    delta = chosen.delta
    # σ for identical inputs is solved once and cached on disk (common.privacy.calibration_cache).
    sigma = p.noise_multiplier or calibrated(calibrate_noise, lambda m: log(INFO, "%s", m))(
        sampler.sample_rate,
        steps * cfg.num_server_rounds,
        p.target_epsilon,
        delta,
        cfg.privacy.accountant,
        planned_evaluations(cfg),
    )
    return Accountant(
        owner=silo_owner(partition_id),
        unit=p.unit,
        population=sampler.population,
        sample_rate=sampler.sample_rate,
        steps_per_round=steps,
        noise_multiplier=sigma,
        clip=p.clip,
        delta=delta,
        delta_rule=chosen.rule,
        accountant=cfg.privacy.accountant,
        target_epsilon=p.target_epsilon,
        released=RELEASED,
        expected_batch_size=p.batch_size,
    )


def load_accountant(state: RecordDict, cfg: AppConfig, split: UserSplit, partition_id: int) -> Accountant:
    """The silo's accountant from node state, created on first use."""
    if records.STATE_PRIVACY in state.config_records:
        return Accountant.from_json(dict(state.config_records[records.STATE_PRIVACY]))
    acc = new_accountant(cfg, split, partition_id)
    save_accountant(state, acc)
    return acc


def save_accountant(state: RecordDict, acc: Accountant) -> None:
    """Keep the accountant in node state."""
    state[records.STATE_PRIVACY] = ConfigRecord(acc.to_json())


def planned_evaluations(cfg: AppConfig) -> tuple[MechanismUse, ...]:
    """The noisy evaluations of the run (``privacy.release.evaluation = noisy``), for calibration.

    The server evaluates every ``eval.every`` rounds and after the last one.
    """
    if cfg.privacy.release.evaluation != "noisy":
        return ()
    rounds = cfg.num_server_rounds
    count = sum(1 for r in range(1, rounds + 1) if r % cfg.eval.every == 0 or r == rounds)
    return (MechanismUse(cfg.privacy.release.evaluation_noise, 1.0, count),)


def noisy_evaluation(
    state: RecordDict,
    cfg: AppConfig,
    split: UserSplit,
    partition_id: int,
    server_round: int,
    sums: dict[str, Any],
    held_by_server: int,
) -> RecordDict | None:
    """The reply of a noisy evaluation (sums + noise, its release, new ledger lines), or None.

    None when the silo has no accountant yet (it never trained) or when the release
    would take its ε above ``privacy.local.target-epsilon``: the evaluation is then
    withheld. The release is composed into the same accountant and ledger as the
    silo's DP-SGD rounds.
    """
    if records.STATE_PRIVACY not in state.config_records:
        return None
    acc = load_accountant(state, cfg, split, partition_id)
    use = MechanismUse(cfg.privacy.release.evaluation_noise, 1.0, 1)
    if acc.target_epsilon > 0:
        exceeds, after = would_exceed(acc.uses, use, acc.delta, acc.target_epsilon, acc.accountant)
        if exceeds:
            log(
                INFO,
                "silo %d withholds its evaluation of round %d: a noisy release would take ε to %.3f > budget %g",
                partition_id, server_round, after, acc.target_epsilon,
            )
            return None
    rng = np.random.default_rng(secrets.randbits(128))  # fresh OS entropy, as for DP-SGD's batches
    noisy = release.noisy_evaluation(sums, cfg.eval.k, use.noise_multiplier, rng)
    sensitivity = release.evaluation_sensitivity(cfg.eval.k)
    event = acc.evaluation_release(server_round, use, sensitivity, release.NOISY_RELEASED)
    chain = load_ledger(state, partition_id)
    chain.append_release(event)
    save_ledger(state, chain)
    save_accountant(state, acc)
    return RecordDict(
        {
            records.METRICS: MetricRecord({**noisy, records.EVAL_NOISY: 1, records.PARTITION_ID: partition_id}),
            records.PRIVACY: ConfigRecord(event.to_json()),
            records.LEDGER: ledger_record(chain, partition_id, held_by_server),
        }
    )


@dataclass(frozen=True, slots=True)
class PrivateRoundResult:
    """Outcome of one round under local DP: trained (with stats) or declined."""

    release: PrivacyRelease
    stats: TrainStats | None

    @property
    def trained(self) -> bool:
        return self.release.trained


def private_round(
    model: Recommender,
    cfg: AppConfig,
    split: UserSplit,
    acc: Accountant,
    server_round: int,
    device: torch.device,
) -> PrivateRoundResult:
    """Train one round of DP-SGD unless it would take ε above the budget.

    The budget check runs *before* any step, so a silo never exceeds
    ``privacy.local.target-epsilon``. On success ``acc`` holds the new use.
    """
    p = cfg.privacy.local
    exceeds, eps_after = acc.would_exceed()
    if exceeds:
        return PrivateRoundResult(acc.release(server_round, epsilon_if_trained=eps_after), None)
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
        user_refit_positives=p.optimizer.user_refit_positives,
        negative_items=split.num_items - cfg.audit.canaries,
    )
    # Noise and sampling come from fresh OS entropy: a seed in the run config would
    # let anyone who knows it subtract the noise. "csprng" draws the noise itself from
    # the OS CSPRNG; batches and negatives always come from the numpy generator.
    rng = np.random.default_rng(secrets.randbits(128))
    noise: NoiseSource
    if cfg.privacy.noise_generator == "csprng":
        noise = CsprngNormal()
    else:
        noise = TorchNormal(torch.Generator(device=device).manual_seed(secrets.randbits(63)))
    planned = acc.planned()
    stats, use = dp_train(
        model, split, cfg.train, settings, steps=planned.steps, rng=rng, noise=noise, device=device
    )
    if cfg.audit.unsafe_disable_noise:
        use = planned  # the broken run's claim: what the accountant and ledger record
    acc.record(server_round, use)
    return PrivateRoundResult(acc.release(server_round), stats)


# ---------------------------------------------------------------- ledger
def load_ledger(state: RecordDict, partition_id: int) -> Chain:
    """The silo's ledger from node state (verified), empty on first use."""
    owner = silo_owner(partition_id)
    if records.STATE_LEDGER not in state.config_records:
        return Chain(owner)
    lines = state.config_records[records.STATE_LEDGER][records.LEDGER_LINES]
    return Chain(owner, [str(x) for x in lines], source="node state")  # type: ignore[union-attr]


def save_ledger(state: RecordDict, chain: Chain) -> None:
    """Keep the ledger in node state."""
    state[records.STATE_LEDGER] = ConfigRecord({records.LEDGER_LINES: chain.lines})


def ledger_record(chain: Chain, partition_id: int, held_by_server: int) -> ConfigRecord:
    """The lines the server does not hold yet (all of them if it says it holds more)."""
    start = held_by_server if 0 <= held_by_server <= len(chain) else 0
    return ConfigRecord(
        {
            records.LEDGER_PARTITION: partition_id,
            records.LEDGER_FIRST_SEQ: start,
            records.LEDGER_LINES: chain.lines[start:],
            records.LEDGER_HEAD: chain.head,
        }
    )
