"""Typed, validated settings parsed once from Flower's run config and node config.

Defaults live only in ``[tool.flwr.app.config]`` of ``pyproject.toml``; the parser
requires every key, rejects unknown ones and names the key in every error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from common.errors import ConfigError
from common.run_config import ConfigReader, Scalar


@dataclass(frozen=True, slots=True)
class SyntheticSettings:
    """Shape of the embedded synthetic data set."""

    num_users: int
    num_items: int
    dim: int
    num_categories: int
    mean_interactions: int


#: Spellings ``data.sep`` accepts, and the field separator each means ("" = infer).
DATA_SEPARATORS: dict[str, str] = {
    "": "", "\t": "\t", "tab": "\t", ",": ",", "comma": ",", ";": ";", "semicolon": ";",
    "|": "|", "pipe": "|", " ": " ", "space": " ", "::": "::", "double-colon": "::",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class DataSettings:
    """Which data set, how its file is read, how it is split and partitioned.

    ``sep`` is the field separator of a text log (``""``: from the suffix or the
    first line); ``header`` false means the file has no header line and the
    ``*_col`` settings are 0-based column indices; ``timestamp_col`` ``""`` means
    the log has no time (a seeded random leave-one-out split).
    """

    dataset: Literal["synthetic", "ml-100k", "ml-1m", "csv", "parquet"]
    path: str
    partition: Literal["silos", "by-user"]
    skew: Literal["iid", "dirichlet"]
    dirichlet_alpha: float
    eval_negatives: int
    user_col: str
    item_col: str
    timestamp_col: str
    sep: str
    header: bool
    synthetic: SyntheticSettings


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """Recommender architecture.

    ``hybrid-mf`` is biased MF whose item vector adds a learned projection of the
    item's fixed text embedding (``[items]``; docs/cold-start.md). ``item_init``
    names a ``.npy`` file (I, dim) that replaces the initial shared item table
    (``""``: random), or ``"content"``: the top ``dim`` principal components of the
    catalogue's text embeddings (public item content), scaled to std ``item_init_std``;
    with ``item_init_genre_weight`` / ``item_init_year_weight`` > 0 the MovieLens genres
    and release years join the embeddings before the components are taken
    (:func:`common.content.content_item_table`).
    """

    name: Literal["mf", "neumf", "hybrid-mf"]
    dim: int
    mlp_layers: tuple[int, ...]
    item_init: str
    item_init_std: float
    item_init_genre_weight: float
    item_init_year_weight: float


@dataclass(frozen=True, slots=True)
class ItemSettings:
    """Item content (``[items]``): where item texts come from and how they are encoded.

    ``path`` ``""`` means MovieLens' own item file (``u.item``, ``movies.dat``);
    ``text_cols`` are joined into one text per item; ``encoder`` is a
    sentence-transformers model name or directory; ``cache_dir`` ``""`` means
    ``~/.cache/fedrec/text-embeddings``; ``device`` ``auto`` is CUDA when available.
    """

    path: str
    id_col: str
    text_cols: tuple[str, ...]
    encoder: str
    cache_dir: str
    device: Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True, slots=True)
class TrainSettings:
    """Local training in each silo."""

    local_epochs: int
    batch_size: int
    lr: float
    l2: float
    loss: Literal["bce", "bpr"]
    num_negatives: int


@dataclass(frozen=True, slots=True)
class EvalSettings:
    """Evaluation protocol."""

    k: int
    full_ranking: bool
    full_ranking_k: int
    every: int
    memory_mb: float  # working-memory budget of scoring (common.evaluation.EvalProtocol)
    val_users: int  # validation on a fixed random subset of at most this many users per silo (0 = all)
    fused: bool  # one exchange per round: the next train message also evaluates (server.loop.run_rounds)


@dataclass(frozen=True, slots=True)
class StrategySettings:
    """Server-side round settings and the defences against faulty or hostile silos.

    ``norm_bound`` = 0 means adaptive: ``norm_bound_factor`` × the median update
    norm of the round. ``max_weight`` = 0 means "the registered weight of each silo"
    (see :mod:`server.registry`).
    """

    fraction_train: float
    fraction_evaluate: float
    min_nodes: int
    timeout: float
    aggregator: Literal["fedavg", "median", "trimmed-mean", "krum"]  # "auto" resolved at parse time
    trim_fraction: float
    krum_malicious: int
    krum_selected: int  # 0 = n - krum_malicious (multi-Krum); 1 = Krum
    norm_action: Literal["clip", "reject", "none"]
    norm_bound: float
    norm_bound_factor: float
    max_weight: int
    cap_weights: bool
    reject_opposed: bool
    min_cosine: float


@dataclass(frozen=True, slots=True)
class DPOptimizerSettings:
    """The optimiser of local DP-SGD (``[privacy.local.optimizer]``)."""

    lr: float  # SGD learning rate of the released (shared) parameters
    user_lr: float  # SGD learning rate of users' own rows (refit and DP steps)
    user_epochs: int  # unit = user: epochs refitting users' own rows before the DP steps
    user_refit_positives: int  # unit = user: positives per refit step of one user


@dataclass(frozen=True, slots=True)
class LocalPrivacySettings:
    """The mechanism of local DP-SGD in each silo (``[privacy.local]``).

    A noise multiplier of 0 means "calibrate it to ``target_epsilon`` over the
    planned rounds"; a δ of 0 means "min(1e-5, 1/(10N)) for the silo's N units" (a δ
    ≥ 1/N is refused and one above 1/(10N) is warned about when the silo fixes its
    mechanism, see :func:`common.privacy.accounting.choose_delta`); a target ε of 0
    means "no budget" (only with an explicit noise multiplier).
    """

    unit: Literal["user", "interaction"]
    noise_multiplier: float
    clip: float
    target_epsilon: float
    delta: float
    batch_size: int  # expected units per Poisson batch (q = batch_size / N)
    max_positives: int
    optimizer: DPOptimizerSettings


@dataclass(frozen=True, slots=True)
class ReleaseSettings:
    """What a silo releases beyond the DP mechanism's output (``[privacy.release]``).

    ``evaluation``: ``withheld`` keeps evaluation sums in the silo; ``noisy`` (local
    DP only) releases them through an accounted Gaussian of noise multiplier
    ``evaluation_noise`` (:mod:`common.privacy.release`).
    """

    evaluation: Literal["withheld", "noisy"]
    evaluation_noise: float


@dataclass(frozen=True, slots=True)
class CentralPrivacySettings:
    """Client-level DP-FedAvg on the server (``[privacy.central]``); 0 values as for local."""

    noise_multiplier: float
    clip: float
    sample_rate: float
    target_epsilon: float
    delta: float


@dataclass(frozen=True, slots=True)
class DistributedPrivacySettings:
    """User-level DP over the union of all silos' users under secure aggregation (``[privacy.distributed]``).

    Each round every silo Poisson-samples its users at q = ``users_per_round`` / N_total,
    clips each sampled user's delta of the shared model to ``clip``, adds its noise share
    σ·C/√(S − T) (T = ``max_dishonest_silos``) and the server divides the secure sum by
    q·N_total (:mod:`common.privacy.distributed`, docs/secure-aggregation.md). 0 values as for
    local DP: σ calibrated to ``target_epsilon``; δ = min(1e-5, 1/(10·N_total)).
    """

    noise_multiplier: float
    clip: float
    users_per_round: float  # expected users per round over the union (q = users_per_round / N_total)
    target_epsilon: float
    delta: float
    max_dishonest_silos: int
    user_steps: int  # full-batch Adam steps on each user's own rows per round (never released)
    user_lr: float
    user_l2: float  # L2 on each user's own rows in those steps (the shared rows' local steps use train.l2)
    lr: float  # learning rate of one user's local step on the shared parameters
    server_lr: float
    server_momentum: float  # heavy-ball β (sgd) or Adam's β1 (adam)
    server_optimizer: str  # "sgd" (heavy-ball) or "adam" (bias-corrected Adam on the released mean delta)
    server_beta2: float  # Adam's β2
    server_adam_eps: float  # Adam's τ, added to √v
    popularity: bool  # DP item-popularity histogram at round 1: initialises the item biases
    popularity_epsilon_fraction: float  # share of target_epsilon the histogram spends
    popularity_bias_scale: float  # item biases = scale · centred log(1 + max(ĉ, 0)) of the DP histogram
    freeze_biases: bool  # item biases stay at that anchor and the global bias at its start: nothing moves them
    item_init_scale: float  # the initial item embeddings are multiplied by this (0 = start at zero)
    item_shrink: float  # after each server step the item embeddings are multiplied by 1 − item_shrink
    item_step_kappa: float  # > 0: item i's server step × r_i²/(r_i² + κ²), r_i = DP count / noise std (0 = off)
    top_items: int  # > 0: only the M items with the largest released DP counts have item rows that train (0 = all)
    frozen_dims: int = 0  # the first K columns of the item table keep their public start: no delta, no step
    algorithm: str = "fedavg"  # "fedavg" (per-user clipped deltas) or "als" (DP sufficient statistics, dp_als)
    als_max_items: int = 40  # k: a user's observed terms weigh min(1, √(k/n_u))
    als_row_clip: float = 1.0  # B: the L2 bound of a user's row in the statistics
    als_reg: float = 1.0  # λ
    als_unobserved_weight: float = 0.001  # w₀


@dataclass(frozen=True, slots=True)
class PrivacySettings:
    """Where noise goes (``mode``), the accountant of record, and each mechanism's settings.

    ``noise_generator`` is the source of local DP-SGD's Gaussian noise: ``os-seeded``
    (torch's generator seeded from OS entropy each round) or ``csprng`` (the
    operating system's CSPRNG, slower); central DP's noise does not use it.
    """

    mode: Literal["none", "local", "central", "local+central", "distributed"]
    accountant: Literal["pld", "rdp"]
    noise_generator: Literal["os-seeded", "csprng"]
    local: LocalPrivacySettings
    central: CentralPrivacySettings
    release: ReleaseSettings
    distributed: DistributedPrivacySettings

    @property
    def is_local(self) -> bool:
        """Whether silos run DP-SGD."""
        return self.mode in ("local", "local+central")

    @property
    def is_central(self) -> bool:
        """Whether the server runs client-level DP-FedAvg."""
        return self.mode in ("central", "local+central")


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """Empirical privacy audit: canaries trained with the model.

    ``canaries`` > 0 adds that many canary items to the shared catalogue and, in
    silo ``canary-silo``, one canary user per canary item, each included in training
    independently with probability ½ (drawn from ``seed``); only local DP runs can
    carry canaries. ``central-canaries`` > 0 adds that many canary clients to
    client-level DP (Andrew et al., 2024). ``unsafe-disable-noise`` trains *without*
    noise while accounting and ledger still claim the configured σ: it exists only to
    show that the empirical audit catches broken DP.
    """

    canaries: int
    canary_silo: int
    seed: int
    central_canaries: int
    unsafe_disable_noise: bool


@dataclass(frozen=True, slots=True)
class PersonalizeSettings:
    """Each silo's local adaptation of the shared model to its own users (``[personalize]``).

    When ``enabled``, a silo evaluating a round fine-tunes a copy of the model (the
    parameters ``params`` names) on its own training interactions for up to
    ``epochs`` epochs of Adam at ``lr``, keeps the epoch (0 = no fine-tune) with the
    best validation HR@K of its users, and reports that copy's evaluation sums next to
    the global model's. The copy stays in the silo; the shared model it trains and
    sends is untouched (:mod:`common.personalization`).
    """

    enabled: bool
    params: Literal["item-bias", "items", "all"]
    epochs: int
    lr: float
    #: ``fine-tune``: the copy is fine-tuned when the silo evaluates; ``ditto``: a
    #: personal model is trained every round with a proximal pull ``prox`` toward the
    #: received global model, and mixed with it at evaluation (Ditto; APFL's mixing).
    #: ``recency`` (MF, hybrid-mf): each user's row is shifted toward its latest training items
    #: (``p_u + β · r_u``, m and β chosen per silo on validation; :func:`common.personalization.recency_select`).
    method: Literal["fine-tune", "ditto", "recency"]
    prox: float
    #: A candidate replaces the global model in a silo only if its validation hits beat
    #: the global's by more than ``margin`` paired standard errors (0: any gain).
    margin: float


@dataclass(frozen=True, slots=True)
class SimulationSettings:
    """How simulated clients map onto Flower's simulated nodes (``fedrec simulate``, in-process runs).

    ``clients_per_node`` > 1 packs that many by-user clients into each node
    (:mod:`client.packed`): node ``p`` hosts users ``p·K .. p·K + K − 1`` and replies
    with their weighted mean update, so FedAvg gives the result of one node per client.
    """

    clients_per_node: int


@dataclass(frozen=True, slots=True)
class AppConfig:
    """All settings of one fedrec run."""

    num_server_rounds: int
    seed: int
    run_dir: str
    resume: bool
    state_root: str
    data: DataSettings
    model: ModelSettings
    items: ItemSettings
    train: TrainSettings
    eval: EvalSettings
    strategy: StrategySettings
    privacy: PrivacySettings
    audit: AuditSettings
    personalize: PersonalizeSettings
    simulation: SimulationSettings

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Scalar]) -> AppConfig:
        """Parse Flower's flattened run config (``"train.lr" -> 0.001``).

        Raises
        ------
        ConfigError
            Naming the key, for an unknown, missing, ill-typed or out-of-range value.
        """
        r = ConfigReader(run_config)
        cfg = cls(
            num_server_rounds=r.int("num-server-rounds", lo=1),
            seed=r.int("seed", lo=0),
            run_dir=r.str("run-dir"),
            resume=r.bool("resume"),
            state_root=r.str("state-root"),
            data=DataSettings(
                dataset=r.choice(
                    "data.dataset", ("synthetic", "ml-100k", "ml-1m", "csv", "parquet")
                ),
                path=r.str("data.path"),
                partition=r.choice("data.partition", ("silos", "by-user")),
                skew=r.choice("data.skew", ("iid", "dirichlet")),
                dirichlet_alpha=r.float("data.dirichlet-alpha", lo=0.0, lo_open=True),
                eval_negatives=r.int("data.eval-negatives", lo=1),
                user_col=r.str("data.user-col"),
                item_col=r.str("data.item-col"),
                timestamp_col=r.str("data.timestamp-col"),
                sep=DATA_SEPARATORS[r.choice("data.sep", tuple(DATA_SEPARATORS))],
                header=r.bool("data.header"),
                synthetic=SyntheticSettings(
                    num_users=r.int("data.synthetic.num-users", lo=3),
                    num_items=r.int("data.synthetic.num-items", lo=200),
                    dim=r.int("data.synthetic.dim", lo=1),
                    num_categories=r.int("data.synthetic.num-categories", lo=1),
                    mean_interactions=r.int("data.synthetic.mean-interactions", lo=5),
                ),
            ),
            model=ModelSettings(
                name=r.choice("model.name", ("mf", "neumf", "hybrid-mf")),
                dim=r.int("model.dim", lo=1),
                mlp_layers=r.int_list("model.mlp-layers"),
                item_init=r.str("model.item-init"),
                item_init_std=r.float("model.item-init-std", lo=0.0, lo_open=True),
                item_init_genre_weight=r.float("model.item-init-genre-weight", lo=0.0),
                item_init_year_weight=r.float("model.item-init-year-weight", lo=0.0),
            ),
            items=ItemSettings(
                path=r.str("items.path"),
                id_col=r.str("items.id-col"),
                text_cols=tuple(c.strip() for c in r.str("items.text-cols").split(",") if c.strip()),
                encoder=r.str("items.encoder"),
                cache_dir=r.str("items.cache-dir"),
                device=r.choice("items.device", ("auto", "cpu", "cuda")),
            ),
            train=TrainSettings(
                local_epochs=r.int("train.local-epochs", lo=1),
                batch_size=r.int("train.batch-size", lo=1),
                lr=r.float("train.lr", lo=0.0, lo_open=True),
                l2=r.float("train.l2", lo=0.0),
                loss=r.choice("train.loss", ("bce", "bpr")),
                num_negatives=r.int("train.num-negatives", lo=1),
            ),
            eval=EvalSettings(
                k=r.int("eval.k", lo=1),
                full_ranking=r.bool("eval.full-ranking"),
                full_ranking_k=r.int("eval.full-ranking-k", lo=1),
                every=r.int("eval.every", lo=1),
                memory_mb=r.float("eval.memory-mb", lo=0.0, lo_open=True),
                val_users=r.int("eval.val-users", lo=0),
                fused=r.bool("eval.fused"),
            ),
            strategy=StrategySettings(
                fraction_train=r.float("strategy.fraction-train", lo=0.0, hi=1.0, lo_open=True),
                fraction_evaluate=r.float("strategy.fraction-evaluate", lo=0.0, hi=1.0),
                min_nodes=r.int("strategy.min-nodes", lo=1),
                timeout=r.float("strategy.timeout", lo=0.0, lo_open=True),
                aggregator=r.choice("strategy.aggregator", ("auto", "fedavg", "median", "trimmed-mean", "krum")),
                trim_fraction=r.float("strategy.trim-fraction", lo=0.0, hi=0.49),
                krum_malicious=r.int("strategy.krum-malicious", lo=0),
                krum_selected=r.int("strategy.krum-selected", lo=0),
                norm_action=r.choice("strategy.norm-action", ("clip", "reject", "none")),
                norm_bound=r.float("strategy.norm-bound", lo=0.0),
                norm_bound_factor=r.float("strategy.norm-bound-factor", lo=1.0),
                max_weight=r.int("strategy.max-weight", lo=0),
                cap_weights=r.bool("strategy.cap-weights"),
                reject_opposed=r.bool("strategy.reject-opposed"),
                min_cosine=r.float("strategy.min-cosine", lo=-1.0, hi=1.0),
            ),
            privacy=PrivacySettings(
                mode=r.choice("privacy.mode", ("none", "local", "central", "local+central", "distributed")),
                accountant=r.choice("privacy.accountant", ("pld", "rdp")),
                noise_generator=r.choice("privacy.noise-generator", ("os-seeded", "csprng")),
                local=LocalPrivacySettings(
                    unit=r.choice("privacy.local.unit", ("user", "interaction")),
                    noise_multiplier=r.float("privacy.local.noise-multiplier", lo=0.0),
                    clip=r.float("privacy.local.clip", lo=0.0, lo_open=True),
                    target_epsilon=r.float("privacy.local.target-epsilon", lo=0.0),
                    delta=r.float("privacy.local.delta", lo=0.0, hi=0.5),
                    batch_size=r.int("privacy.local.batch-size", lo=1),
                    max_positives=r.int("privacy.local.max-positives", lo=1),
                    optimizer=DPOptimizerSettings(
                        lr=r.float("privacy.local.optimizer.lr", lo=0.0, lo_open=True),
                        user_lr=r.float("privacy.local.optimizer.user-lr", lo=0.0),
                        user_epochs=r.int("privacy.local.optimizer.user-epochs", lo=0),
                        user_refit_positives=r.int("privacy.local.optimizer.user-refit-positives", lo=1),
                    ),
                ),
                central=CentralPrivacySettings(
                    noise_multiplier=r.float("privacy.central.noise-multiplier", lo=0.0),
                    clip=r.float("privacy.central.clip", lo=0.0, lo_open=True),
                    sample_rate=r.float("privacy.central.sample-rate", lo=0.0, hi=1.0, lo_open=True),
                    target_epsilon=r.float("privacy.central.target-epsilon", lo=0.0),
                    delta=r.float("privacy.central.delta", lo=0.0, hi=0.5),
                ),
                release=ReleaseSettings(
                    evaluation=r.choice("privacy.release.evaluation", ("withheld", "noisy")),
                    evaluation_noise=r.float("privacy.release.evaluation-noise", lo=0.0, lo_open=True),
                ),
                distributed=DistributedPrivacySettings(
                    noise_multiplier=r.float("privacy.distributed.noise-multiplier", lo=0.0),
                    clip=r.float("privacy.distributed.clip", lo=0.0, lo_open=True),
                    users_per_round=r.float("privacy.distributed.users-per-round", lo=0.0, lo_open=True),
                    target_epsilon=r.float("privacy.distributed.target-epsilon", lo=0.0),
                    delta=r.float("privacy.distributed.delta", lo=0.0, hi=0.5),
                    max_dishonest_silos=r.int("privacy.distributed.max-dishonest-silos", lo=0),
                    user_steps=r.int("privacy.distributed.user-steps", lo=0),
                    user_lr=r.float("privacy.distributed.user-lr", lo=0.0),
                    user_l2=r.float("privacy.distributed.user-l2", lo=0.0),
                    lr=r.float("privacy.distributed.lr", lo=0.0, lo_open=True),
                    server_lr=r.float("privacy.distributed.server-lr", lo=0.0, lo_open=True),
                    server_momentum=r.float("privacy.distributed.server-momentum", lo=0.0, hi=1.0),
                    server_optimizer=r.choice("privacy.distributed.server-optimizer", ("sgd", "adam")),
                    server_beta2=r.float("privacy.distributed.server-beta2", lo=0.0, hi=1.0),
                    server_adam_eps=r.float("privacy.distributed.server-adam-eps", lo=0.0, lo_open=True),
                    popularity=r.bool("privacy.distributed.popularity"),
                    popularity_epsilon_fraction=r.float(
                        "privacy.distributed.popularity-epsilon-fraction", lo=0.0, hi=1.0, lo_open=True
                    ),
                    popularity_bias_scale=r.float("privacy.distributed.popularity-bias-scale", lo=0.0),
                    freeze_biases=r.bool("privacy.distributed.freeze-biases"),
                    item_init_scale=r.float("privacy.distributed.item-init-scale", lo=0.0),
                    item_shrink=r.float("privacy.distributed.item-shrink", lo=0.0, hi=1.0),
                    item_step_kappa=r.float("privacy.distributed.item-step-kappa", lo=0.0),
                    top_items=r.int("privacy.distributed.top-items", lo=0),
                    frozen_dims=r.int("privacy.distributed.frozen-dims", lo=0),
                    algorithm=r.choice("privacy.distributed.algorithm", ("fedavg", "als")),
                    als_max_items=r.int("privacy.distributed.als-max-items", lo=1),
                    als_row_clip=r.float("privacy.distributed.als-row-clip", lo=0.0, lo_open=True),
                    als_reg=r.float("privacy.distributed.als-reg", lo=0.0, lo_open=True),
                    als_unobserved_weight=r.float("privacy.distributed.als-unobserved-weight", lo=0.0),
                ),
            ),
            audit=AuditSettings(
                canaries=r.int("audit.canaries", lo=0),
                canary_silo=r.int("audit.canary-silo", lo=0),
                seed=r.int("audit.seed", lo=0),
                central_canaries=r.int("audit.central-canaries", lo=0),
                unsafe_disable_noise=r.bool("audit.unsafe-disable-noise"),
            ),
            personalize=PersonalizeSettings(
                enabled=r.bool("personalize.enabled"),
                params=r.choice("personalize.params", ("item-bias", "items", "all")),
                epochs=r.int("personalize.epochs", lo=1),
                lr=r.float("personalize.lr", lo=0.0, lo_open=True),
                method=r.choice("personalize.method", ("fine-tune", "ditto", "recency")),
                prox=r.float("personalize.prox", lo=0.0),
                margin=r.float("personalize.margin", lo=0.0),
            ),
            simulation=SimulationSettings(clients_per_node=r.int("simulation.clients-per-node", lo=1)),
        )
        r.reject_unknown()
        if cfg.simulation.clients_per_node > 1:
            cfg = _check_packed(cfg)
        if cfg.strategy.aggregator == "auto":
            # Coordinate-wise trimmed mean bounds one silo's pull on every parameter; under
            # central DP the plain sum has by far the smallest sensitivity (S / (q·N)); an
            # audit run's canaries live in one silo's rows, which a robust aggregate drops.
            plain = cfg.privacy.is_central or cfg.audit.canaries > 0 or cfg.privacy.mode == "distributed"
            auto = "fedavg" if plain else "trimmed-mean"
            cfg = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, aggregator=auto))
        if cfg.privacy.release.evaluation == "noisy" and not cfg.privacy.is_local:
            raise ConfigError(
                "privacy.release.evaluation: 'noisy' needs local DP (privacy.mode = local or local+central), "
                f"whose silos account it in their ledgers; privacy.mode is {cfg.privacy.mode!r}. Use 'withheld'"
            )
        if cfg.resume and not cfg.run_dir:
            raise ConfigError("resume: name the run to continue with run-dir")
        if cfg.data.dataset != "synthetic" and not cfg.data.path:
            raise ConfigError(
                f"data.path: dataset {cfg.data.dataset!r} needs a path to its files "
                "(e.g. -c data.path=../shared/data/ml-100k)"
            )
        d = cfg.data
        if (d.sep or not d.header) and d.dataset != "csv":
            key = "data.sep" if d.sep else "data.header"
            raise ConfigError(
                f"{key}: only a delimited text log (data.dataset = \"csv\") has a "
                f"separator and a header line; data.dataset is {d.dataset!r}"
            )
        for key, column in (
            ("data.user-col", d.user_col),
            ("data.item-col", d.item_col),
            ("data.timestamp-col", d.timestamp_col or "0"),
        ):
            if not (d.header or column.isdigit()):
                raise ConfigError(
                    f"{key}: with data.header = false columns are 0-based indices "
                    f"(e.g. {key} = \"0\"), got {column!r}"
                )
        if cfg.eval.k > d.eval_negatives:
            raise ConfigError(
                f"eval.k: {cfg.eval.k} is not below the {d.eval_negatives + 1} candidates "
                f"each user ranks (data.eval-negatives = {d.eval_negatives}, plus the "
                "held-out item), so HR@K would be 1 for everyone; lower eval.k or raise "
                "data.eval-negatives"
            )
        if cfg.model.name == "neumf" and cfg.model.mlp_layers[0] % 2:
            raise ConfigError("model.mlp-layers: the first width must be even")
        if cfg.model.name == "hybrid-mf" and not cfg.items.path and d.dataset not in ("ml-100k", "ml-1m"):
            raise ConfigError(
                f"model.name: hybrid-mf needs item texts; data.dataset {d.dataset!r} has no item file of its "
                "own, so name one with items.path (and items.id-col, items.text-cols)"
            )
        if cfg.model.item_init == "content" and not cfg.items.path and d.dataset not in ("ml-100k", "ml-1m"):
            raise ConfigError(
                f"model.item-init: content needs item texts; data.dataset {d.dataset!r} has no item file of its "
                "own, so name one with items.path (and items.id-col, items.text-cols)"
            )
        metadata = cfg.model.item_init_genre_weight > 0 or cfg.model.item_init_year_weight > 0
        if metadata and (cfg.model.item_init != "content" or d.dataset not in ("ml-100k", "ml-1m")):
            raise ConfigError(
                "model.item-init-genre-weight, model.item-init-year-weight: the genres and release years come "
                f"from the MovieLens item file and join the content table; they need model.item-init = \"content\" "
                f"(is {cfg.model.item_init!r}) and data.dataset ml-100k or ml-1m (is {d.dataset!r})"
            )
        if cfg.model.name == "hybrid-mf" and cfg.audit.canaries:
            raise ConfigError(
                "audit.canaries: canary items have no text, and the canary audit scores item-table rows only; "
                "run the canary audit with model.name = \"mf\" or \"neumf\""
            )
        if cfg.items.path and not cfg.items.text_cols:
            raise ConfigError("items.text-cols: name at least one text column of items.path (e.g. \"title,genres\")")
        if cfg.personalize.enabled and cfg.personalize.method == "recency" and cfg.model.name == "neumf":
            raise ConfigError(
                f"personalize.method: \"recency\" shifts MF's (or hybrid-mf's) users' rows toward their latest items; "
                f"model.name {cfg.model.name!r} has no such rows (use \"fine-tune\" or \"ditto\")"
            )
        if cfg.personalize.enabled and cfg.personalize.params == "item-bias" and cfg.model.name != "mf":
            raise ConfigError(
                f"personalize.params: \"item-bias\" fine-tunes MF's item biases; model.name "
                f"{cfg.model.name!r} has none (use \"items\" or \"all\")"
            )
        p = cfg.privacy
        if p.is_local and p.local.noise_multiplier == 0 and p.local.target_epsilon == 0:
            raise ConfigError(
                "privacy.local.noise-multiplier: local DP needs a noise multiplier or a "
                "privacy.local.target-epsilon to calibrate it to"
            )
        if p.is_local and cfg.data.partition == "by-user":
            raise ConfigError(
                "privacy.mode: with data.partition = by-user every client is one user, so "
                "DP-SGD inside a client has a population of one; use privacy.mode = central "
                "(client-level DP is then user-level)"
            )
        if cfg.audit.canaries and cfg.strategy.aggregator != "fedavg":
            raise ConfigError(
                "audit.canaries: the one-run audit scores the canary items' rows of the aggregated "
                "model, which only the canary silo trains; a robust aggregator discards that silo's "
                f"values there and the audit would see nothing: strategy.aggregator must be \"fedavg\" "
                f"(or \"auto\") in an audit run, got {cfg.strategy.aggregator!r}"
            )
        if p.is_central and cfg.strategy.aggregator != "fedavg" and cfg.audit.central_canaries:
            raise ConfigError(
                "audit.central-canaries: canary clients audit the summed form of central DP; "
                f"strategy.aggregator must be \"fedavg\", got {cfg.strategy.aggregator!r}"
            )
        if p.is_central and cfg.strategy.fraction_train != 1.0:
            raise ConfigError(
                "strategy.fraction-train: central DP samples silos itself "
                "(privacy.central.sample-rate); leave strategy.fraction-train at 1.0"
            )
        if p.is_central and p.central.noise_multiplier == 0 and p.central.target_epsilon == 0:
            raise ConfigError(
                "privacy.central.noise-multiplier: central DP needs a noise multiplier or a "
                "privacy.central.target-epsilon to calibrate it to"
            )
        if p.mode == "distributed":
            _check_distributed(cfg)
        a = cfg.audit
        if a.canaries and not p.is_local:
            raise ConfigError(
                "audit.canaries: canary users audit local DP-SGD; set privacy.mode = local "
                "(or local+central)"
            )
        if a.central_canaries and not p.is_central:
            raise ConfigError(
                "audit.central-canaries: canary clients audit central DP; set "
                "privacy.mode = central (or local+central)"
            )
        if a.unsafe_disable_noise and not (a.canaries or a.central_canaries):
            raise ConfigError(
                "audit.unsafe-disable-noise: only for demonstrating the empirical audit; "
                "it needs audit.canaries or audit.central-canaries"
            )
        return cfg


def _check_packed(cfg: AppConfig) -> AppConfig:
    """``simulation.clients-per-node`` > 1: refuse what needs each client's own reply; ``auto`` → FedAvg.

    A packed node replies with the weighted mean of its clients' updates, which
    FedAvg turns into exactly the average over the clients. Anything that looks at
    one client's update (a robust aggregator, norm bounds, opposed-update
    rejection), samples clients, keeps per-client privacy state or a per-silo
    subset would act on the node instead and change the run's meaning.
    """
    k = cfg.simulation.clients_per_node
    key = "simulation.clients-per-node"
    s = cfg.strategy
    refused = [
        (cfg.data.partition != "by-user", f'data.partition is {cfg.data.partition!r}; packing needs "by-user"'),
        (cfg.privacy.mode != "none",
         f"privacy.mode is {cfg.privacy.mode!r}: per-client DP accounting and client-level DP need each "
         'client\'s own reply; use privacy.mode = "none"'),
        (s.aggregator not in ("auto", "fedavg"),
         f"strategy.aggregator is {s.aggregator!r}, a robust aggregator over each client's update; use \"fedavg\""),
        (s.norm_action != "none",
         f'strategy.norm-action is {s.norm_action!r}, a bound on each client\'s update; set it to "none"'),
        (s.reject_opposed, "strategy.reject-opposed is true, a test of each client's update; set it to false"),
        (s.fraction_train != 1.0, f"strategy.fraction-train is {s.fraction_train:g}: sampling would pick nodes, "
                                  "not clients; use 1.0"),
        (s.fraction_evaluate not in (0.0, 1.0),
         f"strategy.fraction-evaluate is {s.fraction_evaluate:g}: sampling would pick nodes; use 0 or 1"),
        (cfg.eval.val_users > 0, f"eval.val-users is {cfg.eval.val_users}: a per-silo subset; use 0"),
        (cfg.eval.fused, "eval.fused is true: a packed node evaluates in its own evaluate message; use false"),
        (cfg.personalize.enabled, "personalize.enabled is true: personal models are per client; use false"),
        (cfg.resume, "resume is true: packed nodes keep no durable per-client state"),
    ]
    for bad, why in refused:
        if bad:
            raise ConfigError(f"{key} = {k} packs {k} clients into each simulated node, but {why}")
    return dataclasses.replace(cfg, strategy=dataclasses.replace(s, aggregator="fedavg"))


def _check_distributed(cfg: AppConfig) -> None:
    """``privacy.mode = distributed``: refuse what secure aggregation or the per-user deltas cannot do."""
    from common.secagg import check_compatible  # common.secagg imports common.errors only

    check_compatible(cfg)
    dist = cfg.privacy.distributed
    if dist.noise_multiplier == 0 and dist.target_epsilon == 0:
        raise ConfigError(
            "privacy.distributed.noise-multiplier: distributed DP needs a noise multiplier or a "
            "privacy.distributed.target-epsilon to calibrate it to"
        )
    if cfg.model.name != "mf":
        raise ConfigError(
            f"model.name: distributed DP computes each sampled user's delta of MF's item tables; "
            f"model.name {cfg.model.name!r} is not supported with privacy.mode = distributed (use \"mf\")"
        )
    if dist.item_step_kappa > 0 and not dist.popularity:
        raise ConfigError(
            "privacy.distributed.item-step-kappa: weights each item's step by its released DP popularity count; "
            "it needs privacy.distributed.popularity = true (or item-step-kappa = 0)"
        )
    if dist.server_optimizer == "adam" and (dist.server_momentum >= 1.0 or dist.server_beta2 >= 1.0):
        bad = "server-momentum" if dist.server_momentum >= 1.0 else "server-beta2"
        raise ConfigError(
            f"privacy.distributed.{bad}: Adam's bias correction divides by 1 − β^t; with "
            f"server-optimizer = \"adam\" it must be < 1"
        )
    if dist.algorithm == "als" and dist.item_init_scale == 0:
        raise ConfigError(
            "privacy.distributed.item-init-scale: DP-ALS solves the users' rows against the initial item table; "
            "a table of zeros gives rows of zeros and nothing to learn from (use a scale > 0)"
        )
    if dist.algorithm == "als" and (dist.top_items > 0 or dist.item_step_kappa > 0):
        bad = "top-items" if dist.top_items > 0 else "item-step-kappa"
        raise ConfigError(
            f"privacy.distributed.{bad}: shapes DP-FedAvg's server step; privacy.distributed.algorithm = \"als\" "
            f"solves the item rows from the released statistics instead (set {bad} = 0)"
        )
    if dist.frozen_dims >= cfg.model.dim:
        raise ConfigError(
            f"privacy.distributed.frozen-dims: {dist.frozen_dims} frozen columns leave none of model.dim = "
            f"{cfg.model.dim} to learn; use frozen-dims < model.dim (0 = every column learns)"
        )
    if dist.frozen_dims > 0 and dist.algorithm == "als":
        raise ConfigError(
            "privacy.distributed.frozen-dims: DP-ALS solves whole item rows from the released statistics; "
            "set frozen-dims = 0 with privacy.distributed.algorithm = \"als\""
        )
    if dist.frozen_dims > 0 and dist.top_items > 0:
        raise ConfigError(
            "privacy.distributed.frozen-dims: top-items sets the other items' embeddings to 0, frozen columns "
            "included; use one of frozen-dims and top-items (set the other to 0)"
        )
    if dist.top_items > 0 and not dist.popularity:
        raise ConfigError(
            "privacy.distributed.top-items: picks the items that train by their released DP popularity counts; "
            "it needs privacy.distributed.popularity = true (or top-items = 0)"
        )
    if cfg.strategy.fraction_train != 1.0:
        raise ConfigError(
            "strategy.fraction-train: distributed DP samples users in every silo itself "
            "(privacy.distributed.users-per-round); leave strategy.fraction-train at 1.0"
        )
    if cfg.audit.canaries or cfg.audit.central_canaries:
        raise ConfigError("privacy.mode = distributed: audit canaries are not supported yet")
    if cfg.personalize.enabled and cfg.personalize.method != "recency":
        # recency only shifts each user's own row at evaluation (the released model and the silo's own
        # data, nothing sent); the fine-tune and ditto copies are not built for distributed runs yet
        raise ConfigError(
            f"privacy.mode = distributed: personalize.method {cfg.personalize.method!r} is not supported; "
            f"use \"recency\" (or personalize.enabled = false)"
        )


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Facts about the node a ClientApp runs on (Flower's node config).

    In simulation Flower sets ``partition-id`` and ``num-partitions``; in deployment
    the operator passes them with ``--node-config``, plus ``data-path`` (the silo's
    files) and ``state-dir`` (where the silo keeps its durable state: users' private
    parameters, privacy accountant and ledger, round counter).
    """

    partition_id: int
    num_partitions: int
    data_path: str
    state_dir: str = ""

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Scalar]) -> NodeConfig:
        """Parse the node config; ``data-path`` is optional (default: run config's)."""
        r = ConfigReader(node_config)
        num_partitions = r.int("num-partitions", lo=1)
        partition_id = r.int("partition-id", lo=0, hi=num_partitions - 1)
        data_path = r.str("data-path") if "data-path" in node_config else ""
        state_dir = r.str("state-dir") if "state-dir" in node_config else ""
        return cls(partition_id, num_partitions, data_path, state_dir)
