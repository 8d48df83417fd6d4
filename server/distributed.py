"""The server's side of distributed user-level DP (``privacy.mode = "distributed"``).

:class:`DistributedDP` is a :class:`~server.protocol.FedrecStrategy`. Round 1 starts with a
``roster`` exchange (each silo's public N; N_total is their sum, public under the zero-out
relation) that fixes the mechanism (:func:`common.privacy.distributed.mechanism`: q, σ, σ_h,
δ) and, with ``privacy.distributed.popularity``, a ``popularity`` exchange whose secure sum
is the DP item-popularity histogram: it initialises the item biases and is recorded in the
server's ledger at once. Every round then: the model goes out with phase ``train``, each silo
stages its clipped, noised sum of sampled users' deltas and replies without arrays; the
server runs :func:`server.secagg.secure_sum` over the silos that staged (threshold
max(⌊S/2⌋+1, S − T): a sum missing more than T silos aborts, nothing is released and the
model is kept), divides by q·N_total, takes a server step (heavy-ball momentum, post-processing;
with ``top-items`` only the rows of the items with the largest released DP counts step)
and reports the round's release (σ after dropouts, :func:`round_noise_multiplier`) as the
round's ``central`` event. Every secure sum's release is accounted and written to the server
ledger after the silos' masked vectors are in and before the unmask stage, the first moment
the server could learn the sum (write-ahead: a crash or an unmask failure after it leaves ε
counted that was perhaps not spent, never the reverse).

One accountant for the union population: owner ``server``, unit ``user``, N_total, q, relation
zero-out; ``fedrec audit`` replays it. Each silo keeps its own view in its ledger.

Resume (``resume = true``): the server keeps what it derived from released values in
:data:`STATE_FILE` of the run directory (N_total and S the mechanism was calibrated for, the
released DP histogram, the server optimiser's state), written after the prelude and after every
round's step. A resumed server asks the silos' rosters again (public, free), refuses to go on
if they no longer sum to the same N_total over the same S (σ was calibrated for them), rebuilds
the union accountant from every release in its ledger (one of an interrupted round included: it
may have left the server), and releases no second histogram.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from common import records
from common.config import AppConfig
from common.errors import ConfigError
from common.privacy import distributed as dd
from common.privacy import dp_als
from common.privacy.events import DISTRIBUTED_KINDS, SERVER_OWNER, PrivacyRelease
from common.privacy.ledger import releases
from common.secagg import ABORT_EVENT, vectors
from common.secagg.protocol import SecAggError
from common.secagg.quantize import MODULUS_BITS, QuantSpec, range_for
from server.ledger import RunLedgers
from server.protocol import RoundEvents
from server.secagg import DROPOUT_EVENT, dropout_event, missing_stages, named_node, secure_sum

# Secure sums in a row that fail after their release was accounted (a silo sending words far
# outside the grid, or too many silos lost at unmask) before the run stops: each costs ε and
# reveals nothing.
LOST_SUMS_STOP = 2

ITEM_BIAS = "item_bias.weight"
ITEM_EMBEDDING = "item_embedding.weight"
GLOBAL_BIAS = "global_bias.value"


#: The server's distributed-DP state in the run directory (for resume): public values only.
STATE_FILE = "distributed-state.npz"


class DistributedDP:
    """DP-FedAvg over the union of all silos' users through secure aggregation (see the module docstring)."""

    def __init__(
        self, cfg: AppConfig, ledgers: RunLedgers | None = None, state_path: Path | None = None, resumed: bool = False
    ) -> None:
        self.cfg = cfg
        self.state_path = state_path  # STATE_FILE in the run directory (None: nothing kept, no resume)
        self.resumed = resumed
        self.settings = cfg.privacy.distributed
        self.ledgers = ledgers
        self.timeout = cfg.strategy.timeout
        self.mech: dd.Mechanism | None = None
        self.accountant: Any = None
        self.nodes: list[int] = []
        self.rosters: dict[int, int] = {}
        self.partitions: dict[int, int] = {}  # node → the partition id its replies claim
        self.popularity: np.ndarray | None = None  # the released DP histogram (public)
        self.trainable: np.ndarray | None = None  # top-items: the items whose rows train (None = all)
        self._grid: Grid | None = None
        self._sent: ArrayRecord | None = None
        self._config: ConfigRecord | None = None
        self._velocity: np.ndarray | None = None
        self._optimiser_states: list[tuple[int, dict[str, np.ndarray]]] = []  # the last two saved, oldest first
        self._adam: ServerAdam | None = None
        self._stop_reason: str | None = None
        self._lost_sums = 0  # consecutive secure sums that failed after their release was accounted
        self._events = RoundEvents()

    @property
    def stop_reason(self) -> str | None:
        """The union budget's stop, every silo gone, or LOST_SUMS_STOP accounted secure sums lost in a row."""
        return self._stop_reason

    def take_events(self) -> RoundEvents:
        """This round's rejections and the server's release (``central``)."""
        events, self._events = self._events, RoundEvents()
        return events

    # ---------------------------------------------------------------- messages
    def _messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, phase: str, nodes: Iterable[int]
    ) -> list[Message]:
        extra: dict[str, Any] = {records.SERVER_ROUND: server_round, dd.PHASE: phase}
        if self.mech is not None:
            extra.update({dd.POPULATION: self.mech.population, dd.SILOS: self.mech.silos})
        if self.ledgers is not None:
            extra[records.LEDGER_COUNTS] = self.ledgers.counts()
        if phase == "train" and self.settings.top_items > 0 and self.popularity is not None:
            extra[dd.RELEASED_POPULARITY] = [float(x) for x in self.popularity]  # public: each silo picks the top items
        content = RecordDict({records.ARRAYS: arrays, records.CONFIG: ConfigRecord({**config, **extra})})
        return [
            Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n, group_id=str(server_round))
            for n in nodes
        ]

    def _staged(self, server_round: int, replies: Iterable[Message], what: str) -> dict[int, int]:
        """Node → roster N of the replies that staged a vector (or, for the roster, gave N)."""
        out: dict[int, int] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self._reject(server_round, node, f"{what}: silo failed: {msg.error.reason}")
                continue
            metrics = msg.content.metric_records.get(records.METRICS)
            roster = None if metrics is None else metrics.get(records.NUM_EXAMPLES)
            staged = what == "roster" or (metrics is not None and metrics.get(dd.STAGED) == 1)
            if msg.content.array_records:
                self._reject(server_round, node, f"{what}: the reply carries arrays (distributed DP sends none)")
            elif not isinstance(roster, int) or roster < 1 or not staged:
                self._reject(server_round, node, f"{what}: no roster N or no vector staged")
            else:
                out[node] = roster
                partition = None if metrics is None else metrics.get(records.PARTITION_ID)
                if isinstance(partition, int):
                    self.partitions[node] = partition
        return out

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        self._events.rejected.append((node, reason))
        log(WARNING, "round %d: distributed DP: node %d: %s", server_round, node, reason)

    # ---------------------------------------------------------------- round 1 prelude
    def _prelude(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> ArrayRecord:
        arrays = scaled_item_embeddings(arrays, self.settings.item_init_scale)  # the public initial model
        nodes = sorted(grid.get_node_ids())
        replies = grid.send_and_receive(self._messages(1, arrays, config, "roster", nodes), timeout=self.timeout)
        self.rosters = self._staged(1, replies, "roster")
        self.nodes = sorted(self.rosters)
        if not self.nodes:  # configure_train stops the run, naming why
            return arrays
        population = sum(self.rosters.values())
        self.mech = dd.mechanism(
            self.settings, self.cfg.num_server_rounds, population, len(self.nodes), self.cfg.privacy.accountant
        )
        self.accountant = dd.union_accountant(self.mech, SERVER_OWNER, self.cfg.privacy.accountant)
        if self.resumed:
            return self._restore(arrays, server_round - 1)
        m = self.mech
        log(
            INFO,
            "distributed DP: N_total %d users in %d silos, q=%.4g (%.1f users/round), σ=%.4f, C=%g, T=%d "
            "(share σC/√(S−T) = %.4g), σ_h=%.4f, δ=%.3g, secure-sum threshold %d",
            m.population, m.silos, m.rate, m.rate * m.population, m.noise_multiplier, m.clip, m.max_dishonest,
            m.share_std, m.histogram_noise_multiplier, m.delta, m.threshold,
        )  # fmt: skip
        if not self.settings.popularity:
            self._save_state(0)
            return arrays
        messages = self._messages(1, arrays, config, "popularity", self.nodes)
        staged = self._staged(1, grid.send_and_receive(messages, timeout=self.timeout), "popularity")
        num_items = int(arrays["item_bias.weight"].shape[0])
        signal = float(max(self.rosters.values()))  # each user adds at most 1 per item

        def account(missing: int) -> PrivacyRelease:
            sigma = dd.round_noise_multiplier(m.histogram_noise_multiplier, m.silos, m.max_dishonest, missing)
            return dd.record_release(self.accountant, 1, dd.KIND_HISTOGRAM, dd.histogram_use(sigma), m)

        total, release = self._secure_sum(1, staged, num_items, signal, m.histogram_share_std,
                                          m.histogram_noise_multiplier, dd.KIND_HISTOGRAM, account)  # fmt: skip
        if total is None or release is None:
            self._save_state(0)
            return arrays
        self.popularity = total
        log(INFO, "distributed DP: popularity histogram released, ε so far %.4f", release.epsilon)
        arrays = with_popularity_biases(arrays, total, self.settings.popularity_bias_scale)
        if self.settings.top_items > 0:
            self.trainable = dd.top_item_mask(total, self.settings.top_items)
            arrays = with_item_rows_zeroed(arrays, ~self.trainable)
            log(INFO, "distributed DP: the %d items with the largest DP counts train; the other %d rank by bias",
                int(self.trainable.sum()), int((~self.trainable).sum()))  # fmt: skip
        self._save_state(0)
        return arrays

    # ---------------------------------------------------------------- resume
    def _save_state(self, server_round: int) -> None:
        """Write :data:`STATE_FILE` (atomically): N_total, S, the released histogram, the optimiser's state.

        The optimiser's state after the step of ``server_round`` (0: the prelude) is kept with the
        one saved before it: the server may die after this step and before the round's checkpoint,
        and the resumed run restarts from that checkpoint, which needs the state of its own round.
        """
        if self.state_path is None or self.mech is None:
            return
        empty = np.zeros(0)
        adam = self._adam
        optimiser = {
            "velocity": empty if self._velocity is None else self._velocity,
            "adam-t": np.array(0 if adam is None else adam.t),
            "adam-m": empty if adam is None or adam.m is None else adam.m,
            "adam-v": empty if adam is None or adam.v is None else adam.v,
        }  # fmt: skip
        kept = [(r, o) for r, o in self._optimiser_states if r < server_round][-1:]
        self._optimiser_states = [*kept, (server_round, optimiser)]
        state = {
            "population": np.array(self.mech.population), "silos": np.array(self.mech.silos),
            "popularity": empty if self.popularity is None else self.popularity,
        }  # fmt: skip
        for prefix, (r, o) in zip(("", "previous-"), reversed(self._optimiser_states), strict=False):
            state[f"{prefix}round"] = np.array(r)
            state.update({f"{prefix}{k}": v for k, v in o.items()})
        tmp = self.state_path.with_name(self.state_path.name + ".tmp.npz")
        np.savez(tmp, **state)  # type: ignore[arg-type]
        os.replace(tmp, self.state_path)

    def _restore(self, arrays: ArrayRecord, checkpoint_round: int) -> ArrayRecord:
        """A resumed run's prelude: the kept state, the accountant from the ledger; no second histogram.

        ``arrays`` is the checkpoint of round ``checkpoint_round``, the last completed one (its
        biases already anchored, its item table already scaled), so nothing is applied to it
        again; the optimiser restarts from its state after that round's step (the latest one
        saved at or before it: a round whose secure sum aborted took no step).

        Raises
        ------
        ConfigError
            If the state file is missing or unreadable, or the silos' rosters no longer sum to
            the N_total over S silos the run's σ was calibrated for.
        """
        assert self.mech is not None
        path = self.state_path
        if path is None or not path.is_file():
            raise ConfigError(f"resume: {path} is missing; a distributed-DP run cannot resume without it")
        try:
            with np.load(path, allow_pickle=False) as saved:
                state = {k: saved[k] for k in saved.files}
            population, silos = int(state["population"]), int(state["silos"])
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"resume: {path} cannot be read ({exc})") from None
        if (population, silos) != (self.mech.population, self.mech.silos):
            raise ConfigError(
                f"resume: the silos' rosters now sum to N_total = {self.mech.population} users in {self.mech.silos} "
                f"silos; the run's σ was calibrated for {population} users in {silos} silos ({path})"
            )
        if self.ledgers is not None:  # every release counts, also one of an interrupted round
            for rel in releases(self.ledgers.server.chain):
                if rel.kind in DISTRIBUTED_KINDS and rel.use is not None:
                    self.accountant.record(rel.server_round, rel.use)
        self.popularity = state["popularity"] if state["popularity"].size else None
        if self.settings.top_items > 0 and self.popularity is not None:
            self.trainable = dd.top_item_mask(self.popularity, self.settings.top_items)
        saved_rounds = {p: int(state[f"{p}round"]) for p in ("", "previous-") if f"{p}round" in state}
        usable = [(r, prefix) for prefix, r in saved_rounds.items() if r <= checkpoint_round]
        if saved_rounds and not usable:
            raise ConfigError(
                f"resume: {path} holds the server optimiser's state after rounds {sorted(saved_rounds.values())}, "
                f"none at or before the checkpoint of round {checkpoint_round} the run resumes from"
            )
        prefix = max(usable)[1] if usable else ""  # a state file without rounds: its one state
        self._optimiser_states = [(r, {k: state[f"{p}{k}"] for k in ("velocity", "adam-t", "adam-m", "adam-v")})
                                  for r, p in sorted(usable)]  # fmt: skip
        self._velocity = state[f"{prefix}velocity"] if state[f"{prefix}velocity"].size else None
        if int(state[f"{prefix}adam-t"]) > 0:
            s = self.settings
            self._adam = ServerAdam(s.server_lr, s.server_momentum, s.server_beta2, s.server_adam_eps)
            self._adam.t = int(state[f"{prefix}adam-t"])
            self._adam.m, self._adam.v = state[f"{prefix}adam-m"], state[f"{prefix}adam-v"]
        log(INFO, "distributed DP: resumed with N_total %d users in %d silos, union ε so far %.4f",
            population, silos, self.accountant.epsilon())  # fmt: skip
        return arrays

    def _secure_sum(
        self, server_round: int, staged: dict[int, int], length: int, signal: float, share_std: float,
        sigma: float, release: str, account: Callable[[int], PrivacyRelease],
    ) -> tuple[np.ndarray | None, PrivacyRelease | None]:
        """The secure sum of the staged silos' vectors, and its release (None when nothing was accounted).

        Write-ahead accounting: once the masked vectors are in, and before the server asks for
        the unmask shares (so before it can learn the sum), ``account(missing)`` composes the
        release with ``missing`` of the S silos' noise shares absent, and the release goes to
        the server ledger with the silos missing from it. A sum that then fails at unmask keeps
        its ε counted (the ledger says so): the ledger never holds less than the server learnt.
        """
        assert self._grid is not None and self.mech is not None
        m = self.mech
        r = range_for(signal, share_std, length)
        quant = QuantSpec(clip_range=r, modulus_bits=MODULUS_BITS, max_silos=m.silos)
        if len(staged) < m.threshold:
            reason = f"{len(staged)} of {m.silos} silos staged, below the threshold {m.threshold}"
            self._reject(server_round, 0, f"secure sum not run: {reason}; nothing released, the model is kept")
            self._record_abort(server_round, release, staged, reason, None)
            return None, None
        accounted: list[PrivacyRelease] = []

        def before_unmask(survivors: tuple[int, ...], dropped: Mapping[str, tuple[int, ...]]) -> None:
            lost = missing_stages(self.nodes, staged, survivors, dropped)
            if lost:
                self._record_dropouts(server_round, survivors, lost, sigma, release)
            accounted.append(account(len(lost)))
            if self.ledgers is not None:
                self.ledgers.record_server(accounted[0])  # before the server can unmask the sum

        try:
            outcome = secure_sum(
                self._grid, sorted(staged), quant=quant, vector_length=length, server_round=server_round,
                threshold=m.threshold, timeout=self.timeout, before_unmask=before_unmask,
            )  # fmt: skip
        except SecAggError as exc:
            spent = accounted[0] if accounted else None
            self._reject(server_round, 0, f"secure sum aborted, nothing released, the model is kept: {exc}")
            self._record_abort(server_round, release, staged, str(exc), spent)
            if spent is not None:
                self._lost_sums += 1
                if self._lost_sums >= LOST_SUMS_STOP:
                    self._stop_reason = (
                        f"distributed DP: the last {self._lost_sums} secure sums failed after their release was "
                        f"accounted (round {server_round}: {exc}); stopping, so that no more ε goes to sums that are "
                        "never revealed"
                    )
            return None, spent
        self._lost_sums = 0
        if outcome.dropped:
            self._reject(server_round, 0, f"secure sum: dropped {dict(outcome.dropped)}; the sum has "
                         f"{len(outcome.survivors)} of {m.silos} silos")  # fmt: skip
        return outcome.total, accounted[0]

    def _record_abort(
        self, server_round: int, release: str, staged: dict[int, int], reason: str, spent: PrivacyRelease | None
    ) -> None:
        """The server ledger's line for a secure sum that did not complete: nothing was released.

        ``spent``: the release accounted before the unmask stage failed (its ε stays counted).
        """
        assert self.mech is not None
        if self.ledgers is None:
            return
        released = (
            "nothing: no ε spent" if spent is None else
            f"nothing revealed: the sum failed at unmask after its release was accounted; its ε stays counted "
            f"(union ε {spent.epsilon:.6g})"
        )  # fmt: skip
        self.ledgers.server.append(
            ABORT_EVENT, server_round, release=release, silos=self.mech.silos, threshold=self.mech.threshold,
            staged=[named_node(n, self.partitions) for n in sorted(staged)], reason=reason, released=released,
        )  # fmt: skip

    def _record_dropouts(
        self, server_round: int, survivors: Sequence[int], lost: Mapping[int, str], sigma: float, release: str
    ) -> None:
        """Who is missing from the sum and where each was lost: in the record, and in the ledger before the release."""
        assert self.mech is not None
        m = self.mech
        for node, stage in lost.items():
            self._reject(server_round, node, f"not in the secure sum of {release}: lost at {stage}")
        event = dropout_event(
            release=release, silos=m.silos, max_dishonest=m.max_dishonest, noise_multiplier=sigma,
            accounted_noise_multiplier=dd.round_noise_multiplier(sigma, m.silos, m.max_dishonest, len(lost)),
            survivors=survivors, missing=lost, partitions=self.partitions,
        )  # fmt: skip
        log(WARNING, "round %d: distributed DP: %s", server_round, event["noise"])
        if self.ledgers is not None:
            self.ledgers.server.append(DROPOUT_EVENT, server_round, **event)

    # ---------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Round 1: roster and popularity first; then stop at the budget or send the model."""
        self._grid = grid
        if self.mech is None:
            arrays = self._prelude(server_round, arrays, config, grid)
        if not self.nodes:
            self._stop_reason = "distributed DP: no silo gave its roster"
            return []
        exceeds, after = self.accountant.would_exceed()
        if exceeds:
            self._stop_reason = (
                f"distributed privacy budget: round {server_round} would take the union's ε from "
                f"{self.accountant.epsilon():.3f} to {after:.3f} > {self.accountant.target_epsilon}"
            )
            return []
        self._sent = arrays
        self._config = config
        return self._messages(server_round, arrays, config, "train", self.nodes)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Secure sum of the staged silos, ÷ q·N_total, the server's step; the round's release."""
        if self._sent is None or self.mech is None:
            raise RuntimeError("aggregate_train called before configure_train")
        sent, m = self._sent, self.mech
        self._sent = None
        staged = self._staged(server_round, replies, "train")
        shapes = {k: tuple(v.shape) for k, v in sent.items()}
        als = self.settings.algorithm == "als"
        num_items, dim = shapes[ITEM_EMBEDDING]
        length = dp_als.statistics_length(num_items, dim) if als else sum(int(np.prod(s)) for s in shapes.values())
        expected_max = max(self.rosters.values()) * m.rate
        signal = m.clip * (expected_max + 6.0 * math.sqrt(expected_max) + 6.0)  # users per silo: P(more) tiny
        kind = dd.training_kind(self.settings)
        missing = m.silos

        def account(lost: int) -> PrivacyRelease:
            nonlocal missing
            missing = lost
            use = dd.training_use(dd.round_noise_multiplier(m.noise_multiplier, m.silos, m.max_dishonest, lost), m.rate)
            return dd.record_release(self.accountant, server_round, kind, use, m, dd.training_released(self.settings))

        total, release = self._secure_sum(server_round, staged, length, signal, m.share_std, m.noise_multiplier,
                                          kind, account)  # fmt: skip
        self._events.central = release  # accounted (and in the ledger) even if the unmask then failed
        self._events.central_in_ledger = release is not None and self.ledgers is not None
        if total is None:
            return None, MetricRecord({records.TRAIN_SILOS: 0})  # nothing revealed: the model stays
        if als:
            stepped = self._als_step(sent, total, num_items, dim)
            self._save_state(server_round)
            return stepped, MetricRecord({records.TRAIN_SILOS: m.silos - missing})
        mean = dd.server_average(total, m.rate * m.population)
        s = self.settings
        if s.freeze_biases:  # the anchor stays: the noise on the bias coordinates is discarded
            frozen = {k: np.zeros(shapes[k]) for k in (ITEM_BIAS, GLOBAL_BIAS)}
            mean = vectors.flatten({**vectors.unflatten(mean, shapes), **frozen})
        if s.frozen_dims:  # the item table's first K columns keep their public start: their noise is discarded
            parts = vectors.unflatten(mean, shapes)
            parts[ITEM_EMBEDDING][:, : s.frozen_dims] = 0.0
            mean = vectors.flatten(parts)
        weights = np.ones(shapes[ITEM_BIAS][0])  # the server's step on each item's rows
        if self.trainable is not None:  # top-items: the other items' coordinates of the sum are discarded
            weights = weights * self.trainable
        if s.item_step_kappa > 0 and self.popularity is not None:
            weights = weights * item_step_weights(
                self.popularity, m.noise_multiplier * dd.noise_price(m.silos, m.max_dishonest), s.item_step_kappa
            )
        parts = vectors.unflatten(mean, shapes)
        mean = vectors.flatten({**parts, **{k: parts[k] * weights.reshape(-1, *([1] * (parts[k].ndim - 1)))
                                            for k in (ITEM_EMBEDDING, ITEM_BIAS)}})  # fmt: skip
        base = vectors.flatten({k: v.numpy() for k, v in sent.items()})
        new = vectors.unflatten(base + self._step(mean), shapes)
        new[ITEM_EMBEDDING][:, s.frozen_dims :] *= 1.0 - s.item_shrink  # the frozen columns stay as they are
        out = ArrayRecord({k: Array(new[k].astype(sent[k].numpy().dtype)) for k in sent})
        self._save_state(server_round)
        return out, MetricRecord({records.TRAIN_SILOS: m.silos - missing})

    def _als_step(self, sent: ArrayRecord, total: np.ndarray, num_items: int, dim: int) -> ArrayRecord:
        """DP-ALS's item step from the released statistics (post-processing); the biases are 0 under ALS.

        The round's released item counts ĉ become the DP popularity list the silos rank by in
        their evaluation (the report's list at the model's own ε; no histogram phase needed).
        """
        assert self.mech is not None
        s, m = self.settings, self.mech
        rows = dp_als.item_rows(total, num_items, dim, m.population, m.rate, s.als_reg, s.als_unobserved_weight)
        self.popularity = dp_als.released_counts(total, num_items, dim, m.rate)  # the silos rank by it beside the model
        new = {ITEM_EMBEDDING: rows, ITEM_BIAS: np.zeros((num_items, 1)), GLOBAL_BIAS: np.zeros(1)}
        return ArrayRecord({k: Array(new[k].astype(sent[k].numpy().dtype)) for k in sent})

    def _step(self, mean: np.ndarray) -> np.ndarray:
        """The server's step on the released mean delta (post-processing): heavy-ball SGD or Adam."""
        s = self.settings
        if s.server_optimizer == "adam":
            if self._adam is None:
                self._adam = ServerAdam(s.server_lr, s.server_momentum, s.server_beta2, s.server_adam_eps)
            return self._adam.step(mean)
        self._velocity = server_step_velocity(self._velocity, mean, s.server_momentum)
        return s.server_lr * self._velocity

    # ---------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every silo evaluates its own users (and, under the release policy, keeps the sums).

        The message also carries the released DP histogram (public since round 1), so each
        silo adds the sums of ranking its users' candidates by it (``dp-popularity-*``).
        """
        extra: dict[str, Any] = {records.SERVER_ROUND: server_round}
        if self.popularity is not None:  # public since its release: the silos rank by it beside the model
            extra[dd.RELEASED_POPULARITY] = [float(x) for x in self.popularity]
        content = RecordDict({records.ARRAYS: arrays, records.CONFIG: ConfigRecord({**config, **extra})})
        return [
            Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n, group_id=str(server_round))
            for n in sorted(grid.get_node_ids())
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Count the silos that withheld their sums (the only evaluation under distributed DP)."""
        withheld = 0
        for msg in replies:
            if msg.has_error():
                self._reject(server_round, msg.metadata.src_node_id, f"evaluation: silo failed: {msg.error.reason}")
                continue
            metrics = msg.content.metric_records.get(records.METRICS)
            if metrics is not None and metrics.get(records.EVAL_WITHHELD) == 1:
                withheld += 1
        return MetricRecord({records.EVAL_WITHHELD_SILOS: withheld}) if withheld else None


def popularity_biases(histogram: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Item biases from the DP histogram: ``scale`` · (log(1 + max(ĉ, 0)) − its mean) (post-processing)."""
    logs = np.log1p(np.maximum(np.asarray(histogram, dtype=np.float64), 0.0))
    return scale * (logs - logs.mean())


def with_popularity_biases(arrays: ArrayRecord, histogram: np.ndarray, scale: float = 1.0) -> ArrayRecord:
    """``arrays`` with ``item_bias.weight`` replaced by :func:`popularity_biases` (the anchor)."""
    out = ArrayRecord(dict(arrays.items()))
    ref = arrays[ITEM_BIAS].numpy()
    out[ITEM_BIAS] = Array(popularity_biases(histogram, scale).reshape(ref.shape).astype(ref.dtype))
    return out


def with_item_rows_zeroed(arrays: ArrayRecord, items: np.ndarray) -> ArrayRecord:
    """``arrays`` with the item embeddings of the items where ``items`` is true set to 0 (``top-items``)."""
    out = ArrayRecord(dict(arrays.items()))
    ref = arrays[ITEM_EMBEDDING].numpy()
    out[ITEM_EMBEDDING] = Array(np.where(np.asarray(items, dtype=bool)[:, None], 0.0, ref).astype(ref.dtype))
    return out


def scaled_item_embeddings(arrays: ArrayRecord, scale: float) -> ArrayRecord:
    """``arrays`` with the item embeddings multiplied by ``scale`` (``item-init-scale``; 1 = unchanged)."""
    if scale == 1.0:
        return arrays
    out = ArrayRecord(dict(arrays.items()))
    ref = arrays[ITEM_EMBEDDING].numpy()
    out[ITEM_EMBEDDING] = Array((ref * scale).astype(ref.dtype))
    return out


def item_step_weights(histogram: np.ndarray, noise_std: float, kappa: float) -> np.ndarray:
    """w_i = r_i²/(r_i² + κ²), r_i = max(ĉ_i, 0)/noise_std: the server's step weight on item i's rows.

    ĉ_i (the released DP histogram, l2 rule) bounds how much the users' clipped deltas can
    move item i's rows relative to C, and ``noise_std`` = σ·√(S/(S−T)) is the sum's noise
    relative to C; so r_i is an upper signal-to-noise ratio and w_i a Wiener-style shrinkage.
    Post-processing of released values only. σ = 0: every weight is 1.
    """
    if kappa <= 0:
        raise ValueError(f"privacy.distributed.item-step-kappa: must be > 0 here, got {kappa}")
    if noise_std == 0:
        return np.ones(np.asarray(histogram).size)
    r2 = (np.maximum(np.asarray(histogram, dtype=np.float64).ravel(), 0.0) / noise_std) ** 2
    return r2 / (r2 + kappa**2)


def server_step_velocity(velocity: np.ndarray | None, mean: np.ndarray, momentum: float) -> np.ndarray:
    """Heavy-ball velocity v_t = β·v_{t−1} + ū_t (v_1 = ū_1); the server adds server-lr · v_t."""
    return mean if velocity is None else momentum * velocity + mean


class ServerAdam:
    """Bias-corrected Adam on the released mean delta ū_t (FedAdam's server step; post-processing).

    m_t = β1·m_{t−1} + (1 − β1)·ū_t, v_t = β2·v_{t−1} + (1 − β2)·ū_t², and the step is
    lr · m̂_t/(√v̂_t + τ) with m̂_t = m_t/(1 − β1^t), v̂_t = v_t/(1 − β2^t). The delta is the
    direction to move in (users' local descent), so the step is added. Coordinates whose mean
    is 0 (frozen biases, discarded items) never move. τ bounds the step of a coordinate that
    carries mostly noise: one whose |ū| ≪ τ moves by about lr·ū/τ.
    """

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float) -> None:
        if lr <= 0 or tau <= 0 or not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(
                f"server Adam: need lr > 0, tau > 0 and 0 <= beta1, beta2 < 1; got {lr}, {tau}, {beta1}, {beta2}"
            )
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.t = 0
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def step(self, mean: np.ndarray) -> np.ndarray:
        """The step to add to the shared parameters for this round's mean delta."""
        if self.m is None or self.v is None:
            self.m, self.v = np.zeros_like(mean), np.zeros_like(mean)
        if mean.shape != self.m.shape:
            raise ValueError(f"server Adam: the mean delta has shape {mean.shape}, the state {self.m.shape}")
        self.t += 1
        self.m = self.beta1 * self.m + (1.0 - self.beta1) * mean
        self.v = self.beta2 * self.v + (1.0 - self.beta2) * mean * mean
        m_hat = self.m / (1.0 - self.beta1**self.t)
        v_hat = self.v / (1.0 - self.beta2**self.t)
        return self.lr * m_hat / (np.sqrt(v_hat) + self.tau)
