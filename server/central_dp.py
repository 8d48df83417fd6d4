"""Client-level central DP (DP-FedAvg, McMahan et al. 2018) as a strategy wrapper.

Each round every silo is included independently with probability q (Poisson
sampling, so the accountant may use amplification by sampling); each included
silo's update Δ_i = w_i − w of the shared model is clipped to L2 norm S; the server
adds N(0, z²S²) to the sum and divides by the *expected* number of silos q·N:

    w ← w + (Σ_i clip_S(Δ_i) + N(0, z²S² I)) / (q·N)

The unit of privacy is one silo (client): everything a silo contributes. The
server's accountant composes one Poisson-subsampled Gaussian per round with PLD and
the run stops *before* a round that would exceed ``central-target-epsilon``; all
rounds so far stay saved. The inner strategy (validation, evaluation, metrics)
is reused as is; only sampling and aggregation of updates are replaced, because a
FedAvg weighted by data size is not a bounded-sensitivity query.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from common import records
from common.config import PrivacySettings
from common.privacy.accounting import (
    MechanismUse,
    calibrate_noise,
    default_delta,
    epsilon,
    would_exceed,
)
from common.privacy.ledger import MECHANISM, NEIGHBOURING
from server.strategy import SharedModelFedAvg


class ClientLevelDP(Strategy):
    """Wraps :class:`SharedModelFedAvg` with Poisson sampling, clipping and noise.

    Parameters
    ----------
    inner : SharedModelFedAvg
        Validates replies, configures/aggregates evaluation. Its own sampling
        fraction should be 1.0: this wrapper does the sampling.
    settings : PrivacySettings
        ``central-*`` settings.
    num_rounds : int
        Planned rounds (for calibrating z to the target ε).
    rng : numpy.random.Generator, optional
        Sampling and noise source; default fresh OS entropy.
    """

    def __init__(
        self,
        inner: SharedModelFedAvg,
        settings: PrivacySettings,
        num_rounds: int,
        rng: np.random.Generator | None = None,
        canaries: int = 0,
        canary_seed: int = 0,
        disable_noise: bool = False,
    ) -> None:
        self.inner = inner
        # Canary clients (Andrew et al., 2024): simulated members of the population,
        # sampled like real silos; a sampled canary contributes S·c_i for its fixed
        # random unit direction c_i (what clipping makes of a huge update along c_i).
        self.canaries = canaries
        self._canary_rng = np.random.default_rng(canary_seed)
        self._directions: np.ndarray | None = None  # (canaries, d) float32
        self.disable_noise = disable_noise  # audit demonstration only (audit.unsafe-disable-noise)
        self.settings = settings
        self.num_rounds = num_rounds
        self.rng = rng or np.random.default_rng(secrets.randbits(128))
        self.uses: list[MechanismUse] = []
        self.log: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        self.population = 0
        self.delta = settings.central.delta
        self.noise_multiplier = settings.central.noise_multiplier
        self._sent: ArrayRecord | None = None
        self._sampled = 0

    # Attributes the round loop and report read from the inner strategy.
    @property
    def rejected(self) -> list[tuple[int, int, str]]:
        return self.inner.rejected

    @property
    def privacy_log(self) -> list[dict[str, Any]]:
        return self.inner.privacy_log

    @property
    def declined(self) -> list[tuple[int, int]]:
        return self.inner.declined

    def restore(self, rounds: list[dict[str, Any]]) -> None:
        """Resume: the inner logs from ``metrics.jsonl``, the accountant from the server ledger.

        Every ``dp-fedavg`` event counts, also one of a round interrupted before it
        completed (its noisy aggregate may have been released): never under-count.
        """
        self.inner.restore(rounds)
        self.log = [dict(r["central-privacy"]) for r in rounds if r.get("central-privacy")]
        if self.inner.ledgers is None:
            raise RuntimeError("resuming central DP needs the run's ledgers")
        events = self.inner.ledgers.server.chain.events("dp-fedavg")
        self.uses = [MechanismUse(float(e["noise-multiplier"]), float(e["sample-rate"]), int(e["steps"])) for e in events]
        if events:
            first = events[0]
            self.population = int(first["population"])
            self.delta = float(first["delta"])
            self.noise_multiplier = float(first["noise-multiplier"])

    def _fix_mechanism(self, grid: Grid) -> None:
        if self.population:
            return
        self.population = len(list(grid.get_node_ids())) + self.canaries
        if not self.delta:
            self.delta = default_delta(max(self.population, 1))
        if not self.noise_multiplier:
            self.noise_multiplier = calibrate_noise(
                self.settings.central.sample_rate,
                self.num_rounds,
                self.settings.central.target_epsilon,
                self.delta,
                self.settings.accountant,
            )
        log(
            INFO,
            "central DP: %d silos, q=%.3f, z=%.4f, S=%g, δ=%.3g (unit: silo)",
            self.population, self.settings.central.sample_rate, self.noise_multiplier,
            self.settings.central.clip, self.delta,
        )

    def planned(self) -> MechanismUse:
        """One more round of the central mechanism."""
        return MechanismUse(self.noise_multiplier, self.settings.central.sample_rate, 1)

    def epsilon(self) -> float:
        """Client-level ε so far at :attr:`delta`."""
        return epsilon(self.uses, self.delta, self.settings.accountant)

    # ---------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Stop at the budget; otherwise Poisson-sample silos among the inner's messages."""
        self._fix_mechanism(grid)
        target = self.settings.central.target_epsilon
        if target > 0:
            exceeds, eps_after = would_exceed(
                self.uses, self.planned(), self.delta, target, self.settings.accountant
            )
            if exceeds:
                self.stop_reason = (
                    f"central privacy budget: round {server_round} would take the "
                    f"client-level ε from {self.epsilon():.3f} to {eps_after:.3f} > {target}"
                )
                return []
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        keep = self.rng.random(len(messages)) < self.settings.central.sample_rate
        self._sent = arrays
        self._sampled = int(keep.sum())
        return [m for m, k in zip(messages, keep, strict=True) if k]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip each valid update, add noise to the sum, divide by q·N."""
        if self._sent is None:
            raise RuntimeError("aggregate_train called before configure_train")
        accepted = self.inner.accepted_replies(server_round, replies)
        self.stop_reason = self.stop_reason or self.inner.stop_reason
        base = {k: v.numpy().astype(np.float64) for k, v in self._sent.items()}
        total = {k: np.zeros_like(v) for k, v in base.items()}
        clip = self.settings.central.clip
        norms = []
        for msg in accepted:
            got = msg.content.array_records[records.ARRAYS]
            delta = {k: got[k].numpy().astype(np.float64) - base[k] for k in base}
            norm = float(np.sqrt(sum(float((d**2).sum()) for d in delta.values())))
            norms.append(norm)
            factor = min(1.0, clip / (norm + 1e-12))
            for k in base:
                total[k] += factor * delta[k]
        if self.canaries:
            self._add_canaries(total, clip)
        std = 0.0 if self.disable_noise else self.noise_multiplier * clip
        expected = self.settings.central.sample_rate * self.population
        new = ArrayRecord()
        for k, ref in self._sent.items():
            noisy = total[k] + self.rng.normal(0.0, std, size=total[k].shape)
            new[k] = Array((base[k] + noisy / expected).astype(ref.numpy().dtype))
        self.uses.append(self.planned())
        entry = {
            "round": server_round,
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise-multiplier": self.noise_multiplier,
            "sample-rate": self.settings.central.sample_rate,
            "clip": clip,
            "population": self.population,
            "sampled": self._sampled,
            "aggregated": len(accepted),
            "clipped": sum(n > clip for n in norms),
            "accountant": self.settings.accountant,
        }
        self.log.append(entry)
        if self.inner.ledgers is not None:
            self.inner.ledgers.record_server(
                "dp-fedavg",
                server_round,
                unit="client",
                neighbouring=NEIGHBOURING["client"],
                mechanism=MECHANISM,
                sampling="poisson",
                accountant=self.settings.accountant,
                epsilon=entry["epsilon"],
                delta=self.delta,
                **{
                    "delta-rule": "configured" if self.settings.central.delta else "1/N^1.1 for the N silos",
                    "noise-multiplier": self.noise_multiplier,
                    "sample-rate": self.settings.central.sample_rate,
                    "steps": 1,
                    "clip": clip,
                    "population": self.population,
                    "target-epsilon": self.settings.central.target_epsilon,
                    "released": "shared model parameters after the round",
                },
            )
        self._sent = None
        metrics = (
            self.inner.train_metrics_aggr_fn([m.content for m in accepted], records.NUM_EXAMPLES)
            if accepted
            else None
        )
        return new, metrics

    # ---------------------------------------------------------------- canaries
    def _canary_directions(self, shapes: dict[str, tuple[int, ...]]) -> np.ndarray:
        if self._directions is None:
            dim = sum(int(np.prod(s)) for s in shapes.values())
            d = self._canary_rng.standard_normal((self.canaries, dim), dtype=np.float32)
            d /= np.linalg.norm(d, axis=1, keepdims=True)
            self._directions = d
        return self._directions

    def _add_canaries(self, total: dict[str, np.ndarray], clip: float) -> None:
        """Add S·c_i for each canary client Poisson-sampled this round."""
        names = sorted(total)
        directions = self._canary_directions({k: total[k].shape for k in names})
        chosen = self.rng.random(self.canaries) < self.settings.central.sample_rate
        flat = clip * directions[chosen].sum(0, dtype=np.float64)
        offset = 0
        for k in names:
            size = total[k].size
            total[k] += flat[offset : offset + size].reshape(total[k].shape)
            offset += size

    def canary_cosines(self, initial: ArrayRecord, final: ArrayRecord) -> dict[str, Any]:
        """Cosine of each canary direction with the model's total change (one-shot audit input)."""
        names = sorted(initial)
        change = np.concatenate(
            [(final[k].numpy().astype(np.float64) - initial[k].numpy()).ravel() for k in names]
        )
        directions = self._canary_directions({k: tuple(initial[k].shape) for k in names})
        cosines = directions.astype(np.float64) @ change / (np.linalg.norm(change) + 1e-30)
        return {"cosines": cosines.tolist(), "dim": int(change.size), "canaries": self.canaries}

    # ---------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated to the inner strategy."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegated to the inner strategy."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the mechanism."""
        log(INFO, "ClientLevelDP(z=%s, S=%s, q=%s) around:", self.noise_multiplier, self.settings.central.clip, self.settings.central.sample_rate)
        self.inner.summary()
