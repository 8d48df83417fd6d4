"""Distributed user-level DP under secure aggregation: the noise-share rule and its accounting.

Unit: one user of any silo, with all of their interactions; neighbouring data sets
add or remove one user. Population: the union of all silos' users, N_total.

Each round (DP-FedAvg with each silo as its own users' trusted aggregator):

1. every silo samples each of its users independently with probability
   q = (expected users per round) / N_total (Poisson; :func:`poisson_sample`);
2. clips each sampled user's delta of the shared parameters to L2 norm ≤ C
   (:func:`clip_to_norm`) and sums them;
3. adds its *share* of Gaussian noise, N(0, s²·I) with s = σ·C/√(S − T)
   (:func:`noise_share_std`), where S is the number of silos and T =
   ``max_dishonest`` the number of silos whose noise may be known to the adversary
   (colluding with the server) or missing (dropped out);
4. the secure sum releases Σ clipped deltas + Σ shares; the server divides by the
   fixed expected number of users q·N_total (:func:`server_average`), so one user
   moves the released average by at most C/(q·N_total).

The noise-share rule: any S − T shares together have variance (S − T)·s² = σ²C², so
the sum carries at least the full σ·C from the honest, present silos as long as at
most T silos' noise is known or missing in total. The price: with every silo honest
and present the sum carries σ·C·√(S/(S − T)) — std inflated by √(S/(S − T)) (1.12×
for S = 5, T = 1; 1.29× for T = 2). A round in which d > T silos dropped carries only
σ·√((S − d)/(S − T)): :func:`round_noise_multiplier` gives the σ to account for the
round (the lead's ledger records that, not the nominal σ).

Accounting: each round is one Poisson-subsampled Gaussian step (σ_round, q) over the
union population; the item-popularity histogram (:func:`user_item_vector`) is one
Gaussian mechanism of sensitivity Δ_h with noise σ_h·Δ_h, shared by the same rule.
:func:`union_dp_event` composes them into one dp-accounting event and
:func:`union_epsilon` gives ε at δ with dp-accounting's PLD accountant. The secure sum's
quantisation needs no term of its own: with the pairs' zero-sum dither the released integer
sum is a function of the exact sum of the silos' noised vectors (the Lemma in
:mod:`common.secagg.quantize`), i.e. post-processing of this Gaussian mechanism.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import dp_accounting
import numpy as np
from dp_accounting import pld

from common.privacy.events import DISTRIBUTED_ALS, DISTRIBUTED_FEDAVG, DISTRIBUTED_HISTOGRAM, MechanismUse, mechanism_of
from common.secagg.protocol import default_threshold

KIND_TRAINING: Final = DISTRIBUTED_FEDAVG
KIND_HISTOGRAM: Final = DISTRIBUTED_HISTOGRAM
KIND_ALS: Final = DISTRIBUTED_ALS  # a DP-ALS round (algorithm = "als")
TRAINING_KINDS: Final = (KIND_TRAINING, KIND_ALS)
UNIT: Final = "user"
NEIGHBOURING: Final = "add or remove one user of any silo, with all of their interactions"
_RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


class DistributedDPError(ValueError):
    """Invalid distributed-DP parameters (names the parameter)."""


def _check_silos(silos: int, max_dishonest: int) -> None:
    if silos < 1:
        raise DistributedDPError(f"silos: must be >= 1, got {silos}")
    if not 0 <= max_dishonest < silos:
        raise DistributedDPError(
            f"privacy.max-dishonest-silos: must be in 0..{silos - 1} (fewer than {silos} silos), got {max_dishonest}"
        )


# ------------------------------------------------------------------ noise shares
def noise_share_std(noise_multiplier: float, clip: float, silos: int, max_dishonest: int) -> float:
    """s = σ·C/√(S − T): the std of each silo's Gaussian noise share per coordinate."""
    _check_silos(silos, max_dishonest)
    if noise_multiplier < 0 or clip <= 0:
        raise DistributedDPError(f"need noise_multiplier >= 0 and clip > 0, got {noise_multiplier}, {clip}")
    return noise_multiplier * clip / math.sqrt(silos - max_dishonest)


def noise_price(silos: int, max_dishonest: int) -> float:
    """√(S/(S − T)): the std of the all-honest sum's noise relative to σ·C."""
    _check_silos(silos, max_dishonest)
    return math.sqrt(silos / (silos - max_dishonest))


def round_noise_multiplier(noise_multiplier: float, silos: int, max_dishonest: int, dropped: int) -> float:
    """The σ a round guarantees when ``dropped`` silos' shares are missing from the sum.

    σ·√((S − max(d, T))/(S − T)): σ itself while d ≤ T (the T known-or-missing shares
    the rule budgets for); less when more silos dropped. 0 when none are left.
    """
    _check_silos(silos, max_dishonest)
    if not 0 <= dropped <= silos:
        raise DistributedDPError(f"dropped: must be in 0..{silos}, got {dropped}")
    return noise_multiplier * math.sqrt((silos - max(dropped, max_dishonest)) / (silos - max_dishonest))


def secagg_threshold(silos: int, max_dishonest: int) -> int:
    """max(⌊S/2⌋ + 1, S − T): a secure-sum threshold that never releases a sum missing more than T silos.

    With this threshold the secure sum aborts (no release, no privacy spent) rather than
    returning a sum whose noise falls below σ·C because more than T shares are missing.
    """
    _check_silos(silos, max_dishonest)
    return max(default_threshold(silos), silos - max_dishonest) if silos >= 2 else silos


# ------------------------------------------------------------------ the silo's side
def sample_rate(expected_users: float, total_users: int) -> float:
    """q = expected users per round / N_total (the Poisson rate of every user of every silo)."""
    if total_users < 1 or not 0 < expected_users <= total_users:
        raise DistributedDPError(
            f"expected users per round must be in (0, N_total = {total_users}], got {expected_users}"
        )
    return expected_users / total_users


def poisson_sample(num_users: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the users (0..num_users-1) sampled independently with probability ``rate``."""
    if not 0 < rate <= 1:
        raise DistributedDPError(f"rate: must be in (0, 1], got {rate}")
    return np.flatnonzero(rng.random(num_users) < rate)


def clip_to_norm(delta: np.ndarray, clip: float) -> np.ndarray:
    """``delta`` scaled down to L2 norm ≤ ``clip`` (unchanged when already within)."""
    if clip <= 0:
        raise DistributedDPError(f"clip: must be > 0, got {clip}")
    norm = float(np.linalg.norm(delta))
    return delta * (clip / norm) if norm > clip else delta


def silo_contribution(
    user_deltas: Iterable[np.ndarray], dim: int, clip: float, share_std: float, rng: np.random.Generator
) -> np.ndarray:
    """Σ over the silo's sampled users of their clipped deltas, plus N(0, share_std²) per coordinate.

    An empty sample gives the noise share alone (the silo still takes part).
    """
    total = np.zeros(dim, dtype=np.float64)
    for delta in user_deltas:
        d = np.asarray(delta, dtype=np.float64).ravel()
        if d.size != dim:
            raise DistributedDPError(f"user delta: has {d.size} values, the shared vector has {dim}")
        total += clip_to_norm(d, clip)
    return total + rng.normal(0.0, share_std, dim)


# ------------------------------------------------------------------ the server's side
def server_average(secure_sum: np.ndarray, expected_users: float) -> np.ndarray:
    """The released mean update: the secure sum divided by the fixed q·N_total (never by the realised count)."""
    if expected_users <= 0:
        raise DistributedDPError(f"expected_users: must be > 0, got {expected_users}")
    return np.asarray(secure_sum, dtype=np.float64) / expected_users


# ------------------------------------------------------------------ popularity histogram
HistogramRule = Literal["l2", "cap"]


def histogram_sensitivity(rule: HistogramRule, max_items: int) -> float:
    """L2 sensitivity of the histogram to one user: 1 (``l2``) or √max_items (``cap``)."""
    if rule == "l2":
        return 1.0
    if rule == "cap":
        if max_items < 1:
            raise DistributedDPError(f"max_items: must be >= 1, got {max_items}")
        return math.sqrt(max_items)
    raise DistributedDPError(f"rule: expected 'l2' or 'cap', got {rule!r}")


def user_item_vector(
    items: Sequence[int], num_items: int, rule: HistogramRule, max_items: int, rng: np.random.Generator
) -> np.ndarray:
    """One user's bounded contribution to the item-popularity histogram.

    ``l2``: 1/√k on each of the user's k distinct items (L2 norm 1). ``cap``: 1 on at
    most ``max_items`` of them, drawn uniformly when the user has more (L2 ≤ √max_items).
    """
    distinct = np.unique(np.asarray(items, dtype=np.int64))
    if distinct.size and (distinct[0] < 0 or distinct[-1] >= num_items):
        raise DistributedDPError(f"items: indices must be in 0..{num_items - 1}")
    out = np.zeros(num_items, dtype=np.float64)
    if distinct.size == 0:
        return out
    histogram_sensitivity(rule, max_items)  # validates rule and max_items
    if rule == "l2":
        out[distinct] = 1.0 / math.sqrt(distinct.size)
    else:
        keep = distinct if distinct.size <= max_items else rng.choice(distinct, max_items, replace=False)
        out[keep] = 1.0
    return out


# ------------------------------------------------------------------ ledger descriptions
def training_use(noise_multiplier: float, rate: float) -> MechanismUse:
    """One round of distributed DP-FedAvg: one Poisson-subsampled Gaussian step (σ_round, q)."""
    return MechanismUse(noise_multiplier, rate, 1)


def histogram_use(noise_multiplier: float) -> MechanismUse:
    """The popularity histogram: one Gaussian step over every user (q = 1), noise σ_h × sensitivity."""
    return MechanismUse(noise_multiplier, 1.0, 1)


def event_parameters(
    kind: str,
    *,
    server_round: int,
    noise_multiplier: float,
    rate: float,
    clip: float,
    population: int,
    silos: int,
    max_dishonest: int,
    survivors: Sequence[int],
    dropped: Sequence[int],
) -> dict[str, Any]:
    """What a ledger event of one distributed-DP release records (kebab-case keys, JSON values).

    ``noise_multiplier`` is the nominal σ; the event carries the σ to account
    (:func:`round_noise_multiplier` of the dropped count) as ``noise-multiplier`` and
    the nominal one as ``nominal-noise-multiplier``.
    """
    if kind not in (*TRAINING_KINDS, KIND_HISTOGRAM):
        raise DistributedDPError(f"kind: expected one of {', '.join((*TRAINING_KINDS, KIND_HISTOGRAM))}, got {kind!r}")
    accounted = round_noise_multiplier(noise_multiplier, silos, max_dishonest, len(dropped))
    return {
        "kind": kind,
        "round": server_round,
        "unit": UNIT,
        "neighbouring": NEIGHBOURING,
        "mechanism": mechanism_of(rate)[0],
        "sampling": mechanism_of(rate)[1],
        "noise-multiplier": accounted,
        "nominal-noise-multiplier": noise_multiplier,
        "sample-rate": rate,
        "steps": 1,
        "clip": clip,
        "population": population,
        "expected-users": rate * population,
        "silos": silos,
        "max-dishonest-silos": max_dishonest,
        "noise-share-std": noise_share_std(noise_multiplier, clip, silos, max_dishonest),
        "survivors": list(survivors),
        "dropped-silos": list(dropped),
    }


# ------------------------------------------------------------------ accounting
def union_dp_event(rounds: Sequence[MechanismUse], histogram: MechanismUse | None = None) -> dp_accounting.DpEvent:
    """The dp-accounting event of every round (and the histogram) over the union population."""
    steps: dict[tuple[float, float], int] = {}  # equal (σ, q) rounds self-compose: PLD does that by FFT, fast
    for use in rounds:
        if use.steps:
            key = (use.noise_multiplier, use.sample_rate)
            steps[key] = steps.get(key, 0) + use.steps
    events: list[dp_accounting.DpEvent] = []
    for (sigma, q), count in steps.items():
        step: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(sigma)
        if q < 1:
            step = dp_accounting.PoissonSampledDpEvent(q, step)
        events.append(dp_accounting.SelfComposedDpEvent(step, count))
    if histogram is not None:
        events.append(dp_accounting.GaussianDpEvent(histogram.noise_multiplier))
    return dp_accounting.ComposedDpEvent(events)


def union_epsilon(rounds: Sequence[MechanismUse], delta: float, histogram: MechanismUse | None = None) -> float:
    """ε at ``delta`` of the union population (dp-accounting PLD, add/remove one user)."""
    if not 0 < delta < 1:
        raise DistributedDPError(f"delta: must be in (0, 1), got {delta}")
    uses = [*rounds, *([histogram] if histogram is not None else [])]
    if any(u.noise_multiplier == 0 and u.steps for u in uses):
        return math.inf
    accountant = pld.PLDAccountant(_RELATION)
    accountant.compose(union_dp_event(rounds, histogram))
    return float(accountant.get_epsilon(delta))


# ------------------------------------------------------------------ the run's mechanism (both sides)
# Train-config keys of privacy.mode = distributed (server -> silo) and the reply flag (silo -> server).
PHASE: Final = "distributed-phase"  # "roster" | "popularity" | "train"
POPULATION: Final = "distributed-population"  # N_total: the sum of the silos' public rosters
SILOS: Final = "distributed-silos"  # S: silos in the secure sum
RELEASED_POPULARITY: Final = "distributed-dp-popularity"  # evaluate (top-items: also train) config: the DP histogram
STAGED: Final = "secagg-staged"  # reply metric: 1 = the silo staged its vector for this round's secure sum
PHASES: Final = ("roster", "popularity", "train")


def user_item_histogram(users: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
    """Σ over users of :func:`user_item_vector` with the ``l2`` rule (1/√k on each of a user's k items).

    Vectorised over the (user, item) training pairs; one user's row has L2 norm 1, so the
    histogram's sensitivity to one user is 1.
    """
    if users.size == 0:
        return np.zeros(num_items, dtype=np.float64)
    pairs = np.unique(np.asarray(users, dtype=np.int64) * num_items + np.asarray(items, dtype=np.int64))
    pair_user, pair_item = pairs // num_items, pairs % num_items
    _, inverse, counts = np.unique(pair_user, return_inverse=True, return_counts=True)
    return np.bincount(pair_item, weights=1.0 / np.sqrt(counts[inverse]), minlength=num_items).astype(np.float64)


def top_item_mask(histogram: np.ndarray, top: int) -> np.ndarray:
    """Boolean mask of the ``top`` items with the largest released DP counts (``privacy.distributed.top-items``).

    Ties go to the lower item index (a stable sort), so the server and every silo, each
    computing it from the same released histogram, get the same set; ``top`` = 0 or at least
    the number of items: every item. Post-processing of a released value.
    """
    counts = np.asarray(histogram, dtype=np.float64).ravel()
    if not np.isfinite(counts).all():
        raise DistributedDPError("top-items: the released DP histogram has a non-finite count")
    mask = np.zeros(counts.size, dtype=bool)
    if top <= 0 or top >= counts.size:
        mask[:] = True
    else:
        mask[np.argsort(-counts, kind="stable")[:top]] = True
    return mask


@dataclass(frozen=True, slots=True)
class Mechanism:
    """The run's distributed-DP mechanism, a function of public settings and the public N_total and S.

    Both the server and every silo compute it (:func:`mechanism`): a silo never takes σ
    from the server, so a server cannot make it add less noise than the settings say.
    """

    population: int  # N_total
    silos: int  # S
    max_dishonest: int  # T
    rate: float  # q
    clip: float  # C
    noise_multiplier: float  # σ (nominal)
    histogram_noise_multiplier: float  # σ_h (0: no histogram)
    delta: float
    delta_rule: str
    target_epsilon: float
    rounds: int

    @property
    def share_std(self) -> float:
        """Each silo's training noise share σ·C/√(S − T)."""
        return noise_share_std(self.noise_multiplier, self.clip, self.silos, self.max_dishonest)

    @property
    def histogram_share_std(self) -> float:
        """Each silo's histogram noise share σ_h·1/√(S − T) (sensitivity 1)."""
        return noise_share_std(self.histogram_noise_multiplier, 1.0, self.silos, self.max_dishonest)

    @property
    def threshold(self) -> int:
        """The secure sum's threshold: it aborts when more than T silos are missing."""
        return secagg_threshold(self.silos, self.max_dishonest)


def mechanism(settings: Any, num_rounds: int, population: int, silos: int, accountant: str = "pld") -> Mechanism:
    """The mechanism of ``settings`` (:class:`common.config.DistributedPrivacySettings`) over N_total users, S silos.

    δ = ``settings.delta`` or min(1e-5, 1/(10·N_total)) (a δ ≥ 1/N_total is refused). σ_h
    (when ``settings.popularity``) is calibrated so the histogram alone spends
    ``popularity_epsilon_fraction`` of the target ε (σ itself when there is no target);
    σ = ``settings.noise_multiplier`` or calibrated so that ``num_rounds`` rounds at q and the
    histogram together reach the target ε (dp-accounting, zero-out relation).
    """
    from common.privacy.accounting import calibrate_noise, choose_delta  # dp-accounting, cached

    _check_silos(silos, settings.max_dishonest_silos)
    chosen = choose_delta(
        settings.delta, population, key="privacy.distributed.delta", units="the N_total users of all silos",
        owner="the server",
    )  # fmt: skip
    rate = min(1.0, sample_rate(min(settings.users_per_round, population), population))
    eps = settings.target_epsilon
    sigma_h = 0.0
    if settings.popularity:
        sigma_h = (
            calibrate_noise(1.0, 1, eps * settings.popularity_epsilon_fraction, chosen.delta, accountant)  # type: ignore[arg-type]
            if eps > 0
            else settings.noise_multiplier
        )
    sigma = settings.noise_multiplier
    if sigma == 0:
        extra = (histogram_use(sigma_h),) if settings.popularity else ()
        sigma = calibrate_noise(rate, num_rounds, eps, chosen.delta, accountant, extra)  # type: ignore[arg-type]
    return Mechanism(
        population=population,
        silos=silos,
        max_dishonest=settings.max_dishonest_silos,
        rate=rate,
        clip=contribution_bound(settings),
        noise_multiplier=sigma,
        histogram_noise_multiplier=sigma_h,
        delta=chosen.delta,
        delta_rule=chosen.rule,
        target_epsilon=eps,
        rounds=num_rounds,
    )


def contribution_bound(settings: Any) -> float:
    """The L2 bound of one sampled user's contribution to a round's secure sum: C, or DP-ALS's Δ."""
    if settings.algorithm == "als":
        from common.privacy.dp_als import sensitivity

        return sensitivity(settings.als_max_items, settings.als_row_clip)
    return float(settings.clip)


RELEASED: Final = "the secure sum of the silos' clipped, noised per-user deltas, divided by q·N_total"
RELEASED_HISTOGRAM: Final = "the secure sum of the silos' noised item-popularity histograms (l2 rule)"
RELEASED_ALS: Final = (
    "the secure sum of the silos' noised DP-ALS statistics (per item: the sampled users' bounded rows and "
    "weights; the rows' Gram matrix)"
)


def training_released(settings: Any) -> str:
    """What a training round releases under ``settings`` (``algorithm``): the ledger's ``released`` text."""
    return RELEASED_ALS if settings.algorithm == "als" else RELEASED


def training_kind(settings: Any) -> str:
    """The ledger kind of a training round under ``settings``: DP-FedAvg's or DP-ALS's."""
    return KIND_ALS if settings.algorithm == "als" else KIND_TRAINING


def union_accountant(mech: Mechanism, owner: str, accountant: str = "pld") -> Any:
    """The :class:`~common.privacy.accounting.Accountant` of the union population (unit user, N_total, q, σ, C, δ)."""
    from common.privacy.accounting import Accountant

    return Accountant(
        owner=owner,
        unit=UNIT,
        population=mech.population,
        sample_rate=mech.rate,
        steps_per_round=1,
        noise_multiplier=mech.noise_multiplier,
        clip=mech.clip,
        delta=mech.delta,
        delta_rule=mech.delta_rule,
        accountant=accountant,  # type: ignore[arg-type]
        target_epsilon=mech.target_epsilon,
        released=RELEASED,
    )


def record_release(
    acc: Any, server_round: int, kind: str, use: MechanismUse, mech: Mechanism, released: str = RELEASED
) -> Any:
    """Compose ``use`` into ``acc`` and return its :class:`~common.privacy.events.PrivacyRelease`.

    The release carries this use's own σ and q (the histogram: σ_h, q = 1, sensitivity 1;
    a round: σ after dropouts), so a replay composes exactly what was spent.
    """
    import dataclasses

    acc.record(server_round, use)
    histogram = kind == KIND_HISTOGRAM
    return dataclasses.replace(
        acc.release(server_round),
        kind=kind,
        noise_multiplier=use.noise_multiplier,
        sample_rate=use.sample_rate,
        clip=1.0 if histogram else mech.clip,
        released=RELEASED_HISTOGRAM if histogram else released,
    )
