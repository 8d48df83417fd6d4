"""The run report (``report.md``): the run's name, privacy statement, metrics, cost, privacy section."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common import records
from common.privacy.events import DISTRIBUTED_HISTOGRAM, DP_EVALUATION, SERVER_OWNER, PrivacyRelease
from common.privacy.statement import run_releases, statements
from common.round_record import RoundRecord
from common.rundir import RunDir, RunDirError

#: Prefix of a popularity baseline's metrics in a round's evaluation, when it has one.
POPULARITY = "popularity-"
#: Prefix of the ranking by the DP popularity histogram a distributed-DP run released.
DP_POPULARITY = "dp-popularity-"
WITHHELD = "withheld"
SILO_EVALUATION = "## Evaluation kept in the silos"


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What names a run in its report: data set, model, silos, seed, privacy mode, run uid."""

    dataset: str | None
    model: str | None
    silos: int | None
    seed: int | None
    mode: str
    mode_inferred: bool  # no config.json: the mode is read off the rounds
    evaluation_release: str | None  # privacy.release.evaluation
    noise_generator: str | None
    rounds_planned: int | None
    run_uid: str | None

    def line(self) -> str:
        """``**Run:** ml-100k · model mf (d = 32) · 5 silos · seed 42 · privacy `local` · ...``."""
        parts = [
            f"data set `{self.dataset}`" if self.dataset else "data set not recorded",
            f"model `{self.model}`" if self.model else "model not recorded",
            f"{self.silos} silos" if self.silos is not None else "silos not recorded",
            f"seed {self.seed}" if self.seed is not None else "seed not recorded",
            f"privacy mode `{self.mode}`" + (" (read off the rounds: no config.json)" if self.mode_inferred else ""),
        ]
        if self.rounds_planned is not None:
            parts.append(f"{self.rounds_planned} rounds planned")
        parts.append(f"run uid `{self.run_uid}`" if self.run_uid else "run uid not recorded")
        return "**Run:** " + " · ".join(parts) + "."


def run_facts(rounds: Sequence[RoundRecord], run_dir: RunDir | None) -> RunFacts:
    """The run's facts from ``config.json`` (when ``run_dir`` has one) and its rounds."""
    cfg: Mapping[str, Any] = {}
    uid = None
    silos = None
    if run_dir is not None:
        try:
            saved = run_dir.read_config()
            cfg, uid = saved.run_config, saved.run_uid or None
        except RunDirError:
            pass
        try:
            silos = run_dir.read_simulation_clients()
        except (RunDirError, ValueError, TypeError):
            silos = None
    if silos is None:
        silos = _silos_seen(rounds, run_dir)
    mode = cfg.get("privacy.mode")
    inferred = mode is None
    if mode is None:
        local, central = any(r.privacy for r in rounds), any(r.central for r in rounds)
        mode = "local+central" if local and central else "local" if local else "central" if central else "none"
    model = cfg.get("model.name")
    if model is not None and cfg.get("model.dim") is not None:
        model = f"{model}, d = {cfg['model.dim']}"
    seed = cfg.get("seed")
    planned = cfg.get("num-server-rounds")
    return RunFacts(
        dataset=_text(cfg.get("data.dataset")),
        model=None if model is None else str(model),
        silos=silos,
        seed=None if seed is None else int(seed),
        mode=str(mode),
        mode_inferred=inferred,
        evaluation_release=_text(cfg.get("privacy.release.evaluation")),
        noise_generator=_text(cfg.get("privacy.noise-generator")),
        rounds_planned=None if planned is None else int(planned),
        run_uid=uid,
    )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _silos_seen(rounds: Sequence[RoundRecord], run_dir: RunDir | None) -> int | None:
    """Silos without ``simulation.json``: ledgers, the central roster, releases or replies seen."""
    if run_dir is not None:
        ledgers = len(list(run_dir.silo_ledgers()))
        if ledgers:
            return ledgers
    central = [r.central.population for r in rounds if r.central is not None]
    if central:
        return max(central)
    seen = {e.partition_id for r in rounds for e in r.privacy} | {s.partition_id for r in rounds for s in r.silos}
    seen.discard(None)
    if seen:
        return len(seen)
    counts = [r.train.get(records.TRAIN_SILOS) for r in rounds]
    numbers = [int(c) for c in counts if isinstance(c, (int, float)) and not math.isnan(c)]
    return max(numbers) if numbers else None


def releases_by_owner(rounds: Sequence[RoundRecord]) -> dict[str, list[PrivacyRelease]]:
    """Each owner's releases as ``metrics.jsonl`` holds them, in round order."""
    out: dict[str, list[PrivacyRelease]] = {}
    for r in rounds:
        for e in r.privacy:
            out.setdefault(e.owner, []).append(e)
        if r.central is not None:
            out.setdefault(SERVER_OWNER, []).append(r.central)
    return out


def statement_sentences(rounds: Sequence[RoundRecord], facts: RunFacts, run_dir: RunDir | None) -> list[str]:
    """One sentence per owner, from the run's ledgers (or, without them, the rounds' releases)."""
    found: dict[str, list[PrivacyRelease]] = {}
    problems: dict[str, str] = {}
    if run_dir is not None:
        found, problems = run_releases(run_dir)
    if not found and not problems:
        found = releases_by_owner(rounds)
    return statements(found, facts.mode, problems=problems)


def best_round(rounds: list[RoundRecord], k: int) -> RoundRecord | None:
    """The evaluated round with the highest validation HR@K (first on ties)."""
    scored = [r for r in rounds if not math.isnan(r.evaluate.get(f"val-hr@{k}", math.nan))]
    return max(scored, key=lambda r: r.evaluate[f"val-hr@{k}"]) if scored else None


def render_report(rounds: list[RoundRecord], k: int, plot_name: str, *, run_dir: RunDir | None = None) -> str:
    """Markdown report: the run's name and privacy statement, headline metrics, rounds, cost.

    ``run_dir``: the run directory, whose ``config.json`` names the run and whose
    ledgers the statement is generated from; without it the report names what the
    rounds show and takes the releases from them.
    """
    facts = run_facts(rounds, run_dir)
    lines = ["# fedrec run report", "", facts.line(), "", "## Privacy statement", ""]
    lines += [f"- {s}" for s in statement_sentences(rounds, facts, run_dir)]
    lines += ["", "Threat model per mode, the release policy and what no statement covers: `docs/privacy.md`.", ""]
    private = facts.mode != "none"
    final = next((r for r in reversed(rounds) if r.evaluate), None)
    best = best_round(rounds, k)
    if final is not None and best is not None:
        pop = any(key.startswith(POPULARITY) for r in rounds for key in r.evaluate)
        header = ["", "round", f"test HR@{k}", f"test NDCG@{k}", f"val HR@{k}"]
        if pop:
            header += [f"popularity test HR@{k}", f"popularity test NDCG@{k}"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, r in (("final round", final), ("best validation round", best)):
            e = r.evaluate
            cells = [label, str(r.server_round), _fmt(e.get(f"test-hr@{k}")), _fmt(e.get(f"test-ndcg@{k}")),
                     _fmt(e.get(f"val-hr@{k}"))]
            if pop:
                cells += [_fmt(e.get(f"{POPULARITY}test-hr@{k}")), _fmt(e.get(f"{POPULARITY}test-ndcg@{k}"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Sampled protocol: the held-out item ranked among 99 sampled items the user "
            "never interacted with; ties count against it. Hyperparameters (including "
            "the round) are chosen on validation; test is reported.",
        ]
        if not pop:
            lines += [
                "",
                "Popularity baseline: not part of a federated run's evaluation. The same split "
                "ranked by popularity: `fedrec centralized --model popularity` with this run's "
                "data settings.",
            ]
        lines.append("")
    elif private and facts.evaluation_release != "noisy":
        lines += [
            "**Evaluation withheld:** under differential privacy the silos send no evaluation sums "
            "(`privacy.release.evaluation = withheld`); each silo keeps its own in `silo-report.jsonl` "
            "in its state directory. "
            "`privacy.release.evaluation = noisy` (local DP) releases noisy, accounted sums instead.",
            "",
        ]
    lines += dp_popularity_note(facts, run_dir)
    lines += [f"![metrics]({plot_name})", "", "## Rounds", ""]
    keys = [key for key in (f"val-hr@{k}", f"test-hr@{k}", f"test-ndcg@{k}") if any(key in r.evaluate for r in rounds)]
    full = sorted({key for r in rounds for key in r.evaluate if key.startswith("test-full-")})
    extra = [key for key in (f"coverage@{k}", f"arp@{k}", f"test-hr@{k}-gap-least-most-active")
             if any(key in r.evaluate for r in rounds)]
    header = ["round", "train loss", *keys, *full, *extra, "missing", "rejected"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rounds:
        e = r.evaluate
        cells = [
            str(r.server_round),
            _released(r.train.get(records.TRAIN_LOSS), private),
            *(_fmt(e.get(key)) for key in [*keys, *full, *extra]),
            ", ".join(map(str, r.missing_nodes)) or "-",
            "; ".join(f"node {node}: {reason}" for node, reason in r.rejected) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _evaluation_note(facts), "", *render_cost(rounds, private), *render_anomalies(rounds)]
    return "\n".join(lines)


def dp_popularity_note(facts: RunFacts, run_dir: RunDir | None) -> list[str]:
    """Distributed DP: what the DP popularity baseline is, its ε (server ledger), where its numbers are."""
    if facts.mode != "distributed":
        return []
    histogram = None
    if run_dir is not None:
        found, _ = run_releases(run_dir)
        histogram = next((r for r in found.get(SERVER_OWNER, []) if r.kind == DISTRIBUTED_HISTOGRAM), None)
    if histogram is None:
        return ["**DP popularity baseline:** this run released no DP popularity histogram "
                "(`privacy.distributed.popularity = false`, or its secure sum failed).", ""]  # fmt: skip
    return [
        f"**DP popularity baseline:** the item-popularity histogram this run released at round "
        f"{histogram.server_round} (one Gaussian mechanism over the union of the silos' users, σ_h = "
        f"{histogram.noise_multiplier:.4f}, ε = {histogram.epsilon:.4f} at δ = {histogram.delta:.2e} of the run's "
        f"budget {histogram.target_epsilon:g}) is public, so every silo also ranks its users' candidates by it "
        f"and keeps those sums (`{DP_POPULARITY}*`) beside the model's. The model ≥ this list is the floor a "
        "private model must clear; a list spending the run's whole ε would be a little better "
        "(`python -m benchmarks.distributed` measures that one).",
        "",
    ]


def silo_evaluation_section(pooled: Mapping[int, Mapping[str, float]], k: int) -> list[str]:
    """Markdown: the silos' kept evaluation pooled (a simulation holds every silo), model beside the rankings."""
    if not pooled:
        return []
    cols = [
        ("model val", f"val-hr@{k}"), ("model test", f"test-hr@{k}"),
        ("DP popularity (this run's histogram) val", f"{DP_POPULARITY}val-hr@{k}"),
        ("DP popularity (this run's histogram) test", f"{DP_POPULARITY}test-hr@{k}"),
        ("exact popularity test (the silo's item-popularity array, not private)", f"{POPULARITY}test-hr@{k}"),
    ]  # fmt: skip
    cols = [(name, key) for name, key in cols if any(key in m for m in pooled.values())]
    best = max(pooled, key=lambda rnd: pooled[rnd].get(f"val-hr@{k}", -math.inf))
    lines = [
        SILO_EVALUATION,
        "",
        "Each silo's own evaluation sums (never sent to the server under DP), pooled here because this "
        f"simulation's experimenter holds every silo. HR@{k} per round; the round with the best pooled "
        f"validation HR@{k} is marked *.",
        "",
        "| round | silos | " + " | ".join(f"{name} HR@{k}" for name, _ in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for rnd, m in sorted(pooled.items()):
        cells = [f"{rnd}{'*' if rnd == best else ''}", f"{m.get('silos', 0):.0f}"]
        cells += [_fmt(m.get(key)) for _, key in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def append_silo_evaluation(run_dir: RunDir, pooled: Mapping[int, Mapping[str, float]], k: int) -> bool:
    """Add :func:`silo_evaluation_section` to the run's ``report.md`` (once); False when there is nothing to add."""
    if not pooled or not run_dir.report.exists():
        return False
    text = run_dir.report.read_text()
    if SILO_EVALUATION in text:
        text = text[: text.index(SILO_EVALUATION)].rstrip("\n") + "\n"
    run_dir.report.write_text(text + "\n" + "\n".join(silo_evaluation_section(pooled, k)))
    return True


def _evaluation_note(facts: RunFacts) -> str:
    if facts.mode == "none":
        return (
            "Evaluation metrics are aggregates of per-silo sums; like the training loss they are "
            "not differentially private (`privacy.mode = none`)."
        )
    if facts.evaluation_release == "noisy":
        return (
            "Evaluation metrics come from noisy per-silo sums (validation and test users, hits@K, "
            "DCG@K), each release accounted in its silo's ledger (`dp-evaluation`) and so in the "
            "statement above. The training loss is withheld: it stays in each silo."
        )
    return (
        "Under differential privacy the training loss is withheld (it stays in each silo's "
        "`silo-report.jsonl`); "
        "evaluation metrics appear only when the silos release noisy, accounted sums."
    )


def render_cost(rounds: Sequence[RoundRecord], private: bool) -> list[str]:
    """Per round: wall-clock seconds, the slowest silo's training seconds, message bytes."""
    lines = [
        "## Cost",
        "",
        "| round | round seconds | slowest silo's training seconds | its CPU seconds | bytes sent | bytes received |",
        "|---|---|---|---|---|---|",
    ]
    for r in rounds:
        cell = _released(r.train.get(records.TRAIN_SECONDS), private, digits=2)
        cpu = _released(r.train.get(records.TRAIN_CPU_SECONDS), private, digits=2)
        lines.append(
            f"| {r.server_round} | {r.seconds:.2f} | {cell} | {cpu} | {r.bytes_sent:,} | {r.bytes_received:,} |"
        )
    lines += [
        "",
        "Round seconds: the server's wall clock from sending the round's instructions to "
        "aggregating the replies. Training seconds are each silo's wall clock for its local "
        "training, CPU seconds its process's CPU time for it (largest over silos); the silos report them only without "
        "differential privacy, since a DP silo's timing depends on its Poisson batches "
        '("withheld"). Bytes are message payloads (arrays, metric and config values), '
        "without protocol framing.",
        "",
    ]
    return lines


def _released(value: float | None, private: bool, digits: int = 4) -> str:
    """A silo-reported number, or "withheld" where a DP run keeps it in the silo."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return WITHHELD if private else "-"
    return f"{value:.{digits}f}"


def render_anomalies(rounds: list[RoundRecord]) -> list[str]:
    """The silos' updates per round: norm, cosine with the aggregate, weights, what the defences did."""
    if not any(r.silos for r in rounds):
        return []
    flagged = sorted(
        {(s.partition_id, s.node) for r in rounds for s in r.silos if s.outlier or s.rejected},
        key=lambda x: (x[0] is None, x[0] or 0, x[1]),
    )
    lines = ["## Silos' updates (anomaly report)", ""]
    if flagged:
        names = ", ".join(f"silo {pid} (node {node})" if pid is not None else f"node {node}" for pid, node in flagged)
        lines += [f"**Flagged as outliers or rejected in at least one round:** {names}.", ""]
    else:
        lines += ["No silo was flagged: every update was within the norm bound and agreed with the aggregate.", ""]
    lines += [
        "| round | silo | node | norm | cosine | weight claimed | weight used | clipped | outlier | rejected |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        for s in sorted(r.silos, key=lambda s: (s.partition_id is None, s.partition_id or 0, s.node)):
            lines.append(
                f"| {r.server_round} | {'-' if s.partition_id is None else s.partition_id} | {s.node} | "
                f"{_num(s.norm)} | {_num(s.cosine)} | {_num(s.weight_claimed)} | {_num(s.weight_used)} | "
                f"{'yes' if s.clipped else '-'} | {'**yes**' if s.outlier else '-'} | {s.rejected or '-'} |"
            )
    lines += [
        "",
        "Norm: L2 norm of the silo's update of the shared model as received; cosine: with the "
        "round's aggregate update; weight used: the claim capped at the silo's registered weight. "
        "An outlier's norm exceeded the round's bound, or its update pointed against the aggregate.",
        "",
    ]
    return lines


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def silo_epsilons(rounds: list[RoundRecord]) -> dict[int, list[tuple[int, float, bool]]]:
    """Per silo: (round, ε after the round, trained?) for every round it replied.

    A round with several releases of one silo (DP-SGD and a noisy evaluation) gives
    one point: the largest ε (the last composition), trained if any release trained.
    """
    out: dict[int, dict[int, tuple[float, bool]]] = {}
    for r in rounds:
        for e in r.privacy:
            silo = out.setdefault(e.partition_id or 0, {})
            eps, trained = silo.get(r.server_round, (-math.inf, False))
            silo[r.server_round] = (max(eps, e.epsilon), trained or e.trained)
    return {
        silo: [(rnd, eps, trained) for rnd, (eps, trained) in sorted(points.items())]
        for silo, points in sorted(out.items())
    }


def _generator(name: str | None) -> str:
    if name == "csprng":
        return "Gaussian noise of local DP-SGD from `os.urandom` (`privacy.noise-generator = csprng`)"
    if name == "os-seeded":
        return (
            "Gaussian noise of local DP-SGD from torch's generator seeded from OS entropy every round "
            "(`privacy.noise-generator = os-seeded`; not a cryptographic generator)"
        )
    return "the noise generator is not recorded (no config.json)"


def render_privacy(rounds: list[RoundRecord], mode: str, plot_name: str, *, run_dir: RunDir | None = None) -> str:
    """The report's privacy section: per-silo ε per round, mechanism, budget events, central DP."""
    facts = run_facts(rounds, run_dir)
    lines = ["## Privacy", "", f"Mode: **{mode}**.", ""]
    per_silo = silo_epsilons(rounds)
    latest: dict[int, PrivacyRelease] = {}  # each silo's last DP-SGD release (or decline)
    spent: dict[int, float] = {}
    for r in rounds:
        for e in r.privacy:
            silo = e.partition_id or 0
            spent[silo] = max(spent.get(silo, 0.0), e.epsilon)
            if e.kind != DP_EVALUATION:
                latest[silo] = e
    if latest:
        any_e = next(iter(latest.values()))
        lines += [
            "### Local DP (DP-SGD in each silo)",
            "",
            f"Unit of privacy: **{any_e.unit}** (neighbouring data sets: {any_e.neighbouring}). "
            "Mechanism: Poisson-subsampled Gaussian (DP-SGD with per-sample clipping), "
            f"composed over every step of every round with the {any_e.accountant.upper()} "
            f"accountant of dp-accounting; {_generator(facts.noise_generator)}.",
            "",
            "| silo | units N | δ | σ | q | clip C | rounds trained | steps | ε | budget |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for silo, e in sorted(latest.items()):
            lines.append(
                f"| {silo} | {e.population} | {e.delta:.2e} | {e.noise_multiplier:.4f} | "
                f"{e.sample_rate:.4f} | {e.clip:g} | {e.rounds_trained} | {e.total_steps} | "
                f"{spent[silo]:.4f} | {f'{e.target_epsilon:g}' if e.target_epsilon else 'none'} |"
            )
        if any(e.kind == DP_EVALUATION for r in rounds for e in r.privacy):
            lines += ["", "ε includes each silo's noisy evaluations (`dp-evaluation` releases in its ledger)."]
        silos = sorted(per_silo)
        lines += ["", "ε after each round (— = did not reply; * = declined):", ""]
        lines += ["| round | " + " | ".join(f"silo {s}" for s in silos) + " | max |", "|---" * (len(silos) + 2) + "|"]
        points = {s: {rnd: (eps, trained) for rnd, eps, trained in per_silo[s]} for s in silos}
        for r in rounds:
            cells, eps = [], []
            for s in silos:
                if r.server_round not in points[s]:
                    cells.append("—")
                    continue
                value, trained = points[s][r.server_round]
                eps.append(value)
                cells.append(f"{value:.4f}{'' if trained else '*'}")
            lines.append(f"| {r.server_round} | " + " | ".join(cells) + f" | {max(eps) if eps else 0:.4f} |")
        events, stopped = [], set()
        for r in rounds:  # the first decline of each silo
            for e in sorted(r.privacy, key=lambda e: e.partition_id or 0):
                silo = e.partition_id or 0
                if not e.trained and silo not in stopped:
                    stopped.add(silo)
                    would = "∞" if e.epsilon_if_trained is None else f"{e.epsilon_if_trained:.4f}"
                    events.append(
                        f"- silo {silo} stopped at round {r.server_round}: ε spent {e.epsilon:.4f}, "
                        f"one more round would reach {would} > budget {e.target_epsilon:g}"
                    )
        lines += ["", "Budget events:", "", *(events or ["- none: no silo reached its budget"]), ""]
        if any_e.unit == "user":
            lines += [
                "Users' own embedding rows are trained in their silo without noise and never "
                "leave it; each is a function of its user's data and the released parameters "
                "only, so the guarantee is joint DP (what anyone else sees about user u is "
                "(ε, δ)-DP in u's data).",
                "",
            ]
        else:
            lines += [
                "Interaction-level unit: user rows are clipped and noised like item rows, "
                "because an un-noised user row carries every one of its user's interactions "
                "into the item gradients of that user's other interactions.",
                "",
            ]
    central = [(r, r.central) for r in rounds if r.central is not None]
    if central:
        c = central[-1][1]
        lines += [
            "### Central DP (DP-FedAvg on the server)",
            "",
            f"Unit of privacy: **one silo** (neighbouring data sets: {c.neighbouring}). Each round a "
            "silo is included with probability q; each update is clipped to S; Gaussian noise "
            f"of std z·S is added to the sum. N = {c.population} silos (public roster), "
            f"q = {c.sample_rate:g}, z = {c.noise_multiplier:.4f}, S = {c.clip:g}, δ = {c.delta:.2e}, "
            f"accountant {c.accountant.upper()}, "
            + (f"budget {c.target_epsilon:g}." if c.target_epsilon else "no budget."),
            "",
        ]
        if any(r.central_counts is not None for r, _ in central):
            lines += ["| round | silos sampled | aggregated | clipped | ε |", "|---|---|---|---|---|"]
            for r, x in central:
                n = r.central_counts
                counts = "- | - | -" if n is None else f"{n.sampled} | {n.aggregated} | {n.clipped}"
                lines.append(f"| {r.server_round} | {counts} | {x.epsilon:.4f} |")
        else:
            lines += ["| round | ε |", "|---|---|"]
            lines += [f"| {r.server_round} | {x.epsilon:.4f} |" for r, x in central]
            lines += [
                "",
                "How many silos were sampled, aggregated and clipped each round is withheld: those "
                "counts depend on the silos' exact updates, which only the trusted server sees.",
            ]
        lines.append("")
    lines += [f"![privacy]({plot_name})", ""]
    return "\n".join(lines)
