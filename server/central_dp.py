"""Client-level central DP (DP-FedAvg, McMahan et al. 2018) as a wrapper over a fedrec strategy.

Each round every silo is included independently with probability q (Poisson
sampling, so the accountant may use amplification by sampling); each included
silo's update Δ_i = w_i − w of the shared model is clipped to L2 norm S; the server
adds N(0, z²S²) to the sum and divides by the *expected* number of silos q·N:

    w ← w + (Σ_i clip_S(Δ_i) + N(0, z²S² I)) / (q·N)

The unit of privacy is one silo (client): everything a silo contributes. The
server's accountant composes one Poisson-subsampled Gaussian per round with PLD and
the run stops *before* a round that would exceed ``privacy.central.target-epsilon``;
all rounds so far stay saved.

The wrapped strategy validates replies and aggregates the *clipped, equally
weighted* updates (:meth:`~server.protocol.FedrecStrategy.aggregate_updates`); for
FedAvg that is their mean, which this wrapper turns back into the sum above (a
data-size-weighted mean is not a bounded-sensitivity query). Clipping and noise are
the pure functions of :mod:`common.privacy.clipping`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log
from numpy.typing import NDArray

from common import records
from common.config import PrivacySettings
from common.privacy.accounting import Accountant, calibrate_noise, choose_delta
from common.privacy.clipping import clip_update, gaussian_noise
from common.privacy.events import SERVER_OWNER
from common.round_record import CentralCounts
from server.central_canaries import CanaryClients
from server.protocol import RoundEvents, UpdateAggregator

RELEASED = "shared model parameters after the round"


class ClientLevelDP:
    """Wraps a :class:`~server.protocol.UpdateAggregator` with Poisson sampling, clipping and noise.

    Parameters
    ----------
    inner : UpdateAggregator
        Validates replies, aggregates the clipped updates, configures/aggregates
        evaluation. Its own sampling fraction should be 1.0: this wrapper samples.
    settings : PrivacySettings
        ``privacy.central`` and the accountant of record.
    num_rounds : int
        Planned rounds (for calibrating z to the target ε).
    rng : numpy.random.Generator, optional
        Sampling and noise source; default fresh OS entropy.
    canaries : CanaryClients, optional
        Canary clients for the one-shot audit (added to the population).
    disable_noise : bool
        Audit demonstration only (``audit.unsafe-disable-noise``).
    accountant : Accountant, optional
        A resumed run's accountant (rebuilt from the server ledger); by default one
        is created on the first round, when the population is known.
    """

    def __init__(
        self,
        inner: UpdateAggregator,
        settings: PrivacySettings,
        num_rounds: int,
        rng: np.random.Generator | None = None,
        canaries: CanaryClients | None = None,
        disable_noise: bool = False,
        accountant: Accountant | None = None,
        aggregator: str = "fedavg",
        trim_fraction: float = 0.0,
    ) -> None:
        self.inner = inner
        self.settings = settings
        self.num_rounds = num_rounds
        self.rng = rng or np.random.default_rng(secrets.randbits(128))
        self.canaries = canaries
        self.disable_noise = disable_noise
        self.accountant = accountant
        self.aggregator = aggregator
        self.trim_fraction = trim_fraction
        if aggregator != "fedavg" and canaries is not None:
            raise ValueError("canary clients audit the summed form of central DP: use aggregator 'fedavg'")
        self._stop_reason: str | None = None
        self._sent: ArrayRecord | None = None
        self._sampled = 0
        self._central: RoundEvents = RoundEvents()

    @property
    def stop_reason(self) -> str | None:
        """The central budget's stop, or the inner strategy's."""
        return self._stop_reason or self.inner.stop_reason

    def take_events(self) -> RoundEvents:
        """The inner strategy's events plus this round's central release and counts."""
        events = self.inner.take_events()
        events.central, events.central_counts = self._central.central, self._central.central_counts
        self._central = RoundEvents()
        return events

    def _fix_mechanism(self, grid: Grid) -> Accountant:
        if self.accountant is not None:
            return self.accountant
        c = self.settings.central
        population = len(list(grid.get_node_ids())) + (self.canaries.count if self.canaries else 0)
        units = "the N clients: silos and canary clients" if self.canaries else "the N silos"
        chosen = choose_delta(c.delta, max(population, 1), key="privacy.central.delta", units=units, owner="the server")
        if chosen.warning:
            log(WARNING, "central DP: %s", chosen.warning)
        delta = chosen.delta
        sigma = c.noise_multiplier or calibrate_noise(
            c.sample_rate, self.num_rounds, c.target_epsilon, delta, self.settings.accountant
        )
        self.accountant = Accountant(
            owner=SERVER_OWNER,
            unit="client",
            population=population,
            sample_rate=c.sample_rate,
            steps_per_round=1,
            noise_multiplier=sigma,
            clip=c.clip,
            delta=delta,
            delta_rule=chosen.rule,
            accountant=self.settings.accountant,
            target_epsilon=c.target_epsilon,
            released=RELEASED,
        )
        log(
            INFO,
            "central DP: %d silos, q=%.3f, z=%.4f, S=%g, δ=%.3g (unit: silo)",
            population,
            c.sample_rate,
            sigma,
            c.clip,
            delta,
        )
        return self.accountant

    # ---------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Stop at the budget; otherwise Poisson-sample silos among the inner's messages."""
        acc = self._fix_mechanism(grid)
        exceeds, eps_after = acc.would_exceed()
        if exceeds:
            self._stop_reason = (
                f"central privacy budget: round {server_round} would take the "
                f"client-level ε from {acc.epsilon():.3f} to {eps_after:.3f} > {acc.target_epsilon}"
            )
            return []
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        keep = self.rng.random(len(messages)) < acc.sample_rate
        self._sent = arrays
        self._sampled = int(keep.sum())
        return [m for m, k in zip(messages, keep, strict=True) if k]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip each valid update, add noise to the sum, divide by q·N."""
        if self._sent is None or self.accountant is None:
            raise RuntimeError("aggregate_train called before configure_train")
        acc, sent = self.accountant, self._sent
        accepted = self.inner.accept(server_round, replies)
        base = {k: v.numpy().astype(np.float64) for k, v in sent.items()}
        total = {k: np.zeros_like(v) for k, v in base.items()}
        clipped_count = 0
        clipped_replies = []
        for content in accepted:
            got = content.array_records[records.ARRAYS]
            clipped, norm = clip_update({k: got[k].numpy().astype(np.float64) - base[k] for k in base}, acc.clip)
            clipped_count += norm > acc.clip
            clipped_replies.append(_equally_weighted(sent, base, clipped))
        aggregate = self.inner.aggregate_updates(clipped_replies)
        if aggregate is not None:
            for k in base:
                total[k] = aggregate[k].numpy().astype(np.float64) - base[k]
        if self.aggregator == "fedavg":
            # The inner's mean of the clipped updates, back to their sum, divided by q·N:
            # sensitivity S / (q·N) under add/remove of one silo.
            total = {k: len(clipped_replies) * v for k, v in total.items()}
            if self.canaries is not None:
                self.canaries.add_sampled(total, acc.clip, acc.sample_rate, self.rng)
            scale, sensitivity = 1.0 / (acc.sample_rate * acc.population), acc.clip
        else:  # a robust aggregate of the clipped updates, released as it is
            scale, sensitivity = 1.0, robust_sensitivity(self.aggregator, acc.clip, self.trim_fraction)
        std = 0.0 if self.disable_noise else acc.noise_multiplier * sensitivity
        noise = gaussian_noise({k: v.shape for k, v in total.items()}, std, self.rng)
        new = ArrayRecord()
        for k, ref in sent.items():
            new[k] = Array((base[k] + scale * (total[k] + noise[k])).astype(ref.numpy().dtype))
        acc.record(server_round, acc.planned())
        self._central.central = acc.release(server_round)
        self._central.central_counts = CentralCounts(self._sampled, len(accepted), int(clipped_count))
        self._sent = None
        return new, self.inner.aggregate_train_metrics(accepted)

    # ---------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated to the inner strategy."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegated to the inner strategy."""
        return self.inner.aggregate_evaluate(server_round, replies)


def robust_sensitivity(aggregator: str, clip: float, trim_fraction: float) -> float:
    """L2 sensitivity (add/remove one silo) of a robust aggregate of updates clipped to ``clip``.

    Notes
    -----
    Proofs in :func:`server.aggregators.sensitivity`: the coordinate-wise median moves
    by at most C (and exactly C in the worst case, whatever the number of silos); the
    trimmed mean with fraction β by at most 2C / √(1 − 2β); a (multi-)Krum selection's
    mean by at most 2C (it stays inside the ball of radius C). None of them shrinks
    with the number of silos as the mean's C / (q·N) does: central DP over a robust
    aggregate needs q·N times more noise for the same ε. Poisson subsampling still
    amplifies, as for any function of the sampled set with this sensitivity.
    """
    if aggregator == "median":
        return clip
    if aggregator == "trimmed-mean":
        return 2.0 * clip / math.sqrt(1.0 - 2.0 * trim_fraction)
    if aggregator == "krum":
        return 2.0 * clip
    raise ValueError(f"no robust sensitivity for aggregator {aggregator!r}")


def _equally_weighted(
    sent: ArrayRecord, base: dict[str, NDArray[np.float64]], clipped: dict[str, NDArray[np.float64]]
) -> RecordDict:
    """Reply content whose shared arrays are ``base + clipped`` and whose weight is 1."""
    arrays = ArrayRecord({k: Array((base[k] + clipped[k]).astype(sent[k].numpy().dtype)) for k in base})
    return RecordDict({records.ARRAYS: arrays, records.METRICS: MetricRecord({records.NUM_EXAMPLES: 1})})
