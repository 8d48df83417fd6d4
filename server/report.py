"""The run report (``report.md``): headline metrics, per-round table, privacy section."""

from __future__ import annotations

import math
from typing import Any

from common import records
from common.round_record import RoundRecord


def best_round(rounds: list[RoundRecord], k: int) -> RoundRecord | None:
    """The evaluated round with the highest validation HR@K (first on ties)."""
    scored = [r for r in rounds if not math.isnan(r.evaluate.get(f"val-hr@{k}", math.nan))]
    return max(scored, key=lambda r: r.evaluate[f"val-hr@{k}"]) if scored else None


def render_report(rounds: list[RoundRecord], k: int, plot_name: str) -> str:
    """Markdown report: headline metrics, per-round table, traffic."""
    lines = ["# fedrec run report", ""]
    final = next((r for r in reversed(rounds) if r.evaluate), None)
    best = best_round(rounds, k)
    if final is not None and best is not None:
        lines += [
            f"| | round | test HR@{k} | test NDCG@{k} | val HR@{k} |",
            "|---|---|---|---|---|",
        ]
        for label, r in (("final round", final), ("best validation round", best)):
            e = r.evaluate
            lines.append(
                f"| {label} | {r.server_round} | {_fmt(e.get(f'test-hr@{k}'))} | "
                f"{_fmt(e.get(f'test-ndcg@{k}'))} | {_fmt(e.get(f'val-hr@{k}'))} |"
            )
        lines += [
            "",
            "Sampled protocol: the held-out item ranked among 99 sampled items the user "
            "never interacted with; ties count against it. Hyperparameters (including "
            "the round) are chosen on validation; test is reported.",
            "",
        ]
    lines += [f"![metrics]({plot_name})", "", "## Rounds", ""]
    keys = [f"val-hr@{k}", f"test-hr@{k}", f"test-ndcg@{k}"]
    full = sorted({key for r in rounds for key in r.evaluate if key.startswith("test-full-")})
    extra = [f"coverage@{k}", f"arp@{k}", f"test-hr@{k}-gap-least-most-active"]
    header = [
        "round",
        "train loss",
        *keys,
        *full,
        *extra,
        "seconds",
        "bytes sent",
        "bytes received",
        "missing",
        "rejected",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rounds:
        e = r.evaluate
        cells = [
            str(r.server_round),
            _fmt(r.train.get(records.TRAIN_LOSS)),
            *(_fmt(e.get(key)) for key in [*keys, *full, *extra]),
            f"{r.seconds:.2f}",
            f"{r.bytes_sent:,}",
            f"{r.bytes_received:,}",
            ", ".join(map(str, r.missing_nodes)) or "-",
            "; ".join(f"node {node}: {reason}" for node, reason in r.rejected) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Bytes are message payloads (arrays, metric and config values), without "
        "protocol framing. Evaluation metrics are aggregates of per-silo sums; they "
        "are not differentially private.",
        "",
        *render_anomalies(rounds),
    ]
    return "\n".join(lines)


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
    """Per silo: (round, ε after the round, trained?) for every round it replied."""
    out: dict[int, list[tuple[int, float, bool]]] = {}
    for r in rounds:
        for e in r.privacy:
            out.setdefault(e.partition_id or 0, []).append((r.server_round, e.epsilon, e.trained))
    return dict(sorted(out.items()))


def render_privacy(rounds: list[RoundRecord], mode: str, plot_name: str) -> str:
    """The report's privacy section: per-silo ε per round, mechanism, budget events, scope."""
    lines = ["## Privacy", "", f"Mode: **{mode}**.", ""]
    per_silo = silo_epsilons(rounds)
    latest = {e.partition_id or 0: e for r in rounds for e in r.privacy}
    if latest:
        any_e = next(iter(latest.values()))
        lines += [
            "### Local DP (DP-SGD in each silo)",
            "",
            f"Unit of privacy: **{any_e.unit}** (neighbouring data sets: {any_e.neighbouring}). "
            "Mechanism: Poisson-subsampled Gaussian (DP-SGD with per-sample clipping), "
            f"composed over every step of every round with the {any_e.accountant.upper()} "
            "accountant of dp-accounting.",
            "",
            "| silo | units N | δ | σ | q | clip C | rounds trained | steps | ε | budget |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for silo, e in sorted(latest.items()):
            lines.append(
                f"| {silo} | {e.population} | {e.delta:.2e} | {e.noise_multiplier:.4f} | "
                f"{e.sample_rate:.4f} | {e.clip:g} | {e.rounds_trained} | {e.total_steps} | "
                f"{e.epsilon:.4f} | {e.target_epsilon:g} |"
            )
        silos = sorted(per_silo)
        lines += ["", "ε after each round (— = did not reply; * = declined):", ""]
        lines += ["| round | " + " | ".join(f"silo {s}" for s in silos) + " | max |", "|---" * (len(silos) + 2) + "|"]
        for r in rounds:
            by_silo = {e.partition_id or 0: e for e in r.privacy}
            cells = [
                "—" if s not in by_silo else f"{by_silo[s].epsilon:.4f}{'' if by_silo[s].trained else '*'}"
                for s in silos
            ]
            eps = [e.epsilon for e in by_silo.values()]
            lines.append(f"| {r.server_round} | " + " | ".join(cells) + f" | {max(eps) if eps else 0:.4f} |")
        events, stopped = [], set()
        for r in rounds:  # the first decline of each silo
            for e in sorted(r.privacy, key=lambda e: e.partition_id or 0):
                silo = e.partition_id or 0
                if not e.trained and silo not in stopped:
                    stopped.add(silo)
                    events.append(
                        f"- silo {silo} stopped at round {r.server_round}: ε spent {e.epsilon:.4f}, "
                        f"one more round would reach {e.epsilon_if_trained:.4f} > budget {e.target_epsilon:g}"
                    )
        lines += ["", "Budget events:", "", *(events or ["- none: no silo reached its budget"]), ""]
        if any_e.unit == "user":
            lines += [
                "Users' own embedding rows are trained in their silo without noise and never "
                "leave it: the guarantee is joint DP (what anyone else sees about user u is "
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
            "Unit of privacy: **one silo** (add/remove a silo's whole update). Each round a "
            "silo is included with probability q; each update is clipped to S; Gaussian noise "
            f"of std z·S is added to the sum. N = {c.population} silos, q = {c.sample_rate:g}, "
            f"z = {c.noise_multiplier:.4f}, S = {c.clip:g}, δ = {c.delta:.2e}, "
            f"accountant {c.accountant.upper()}.",
            "",
            "| round | silos sampled | aggregated | clipped | ε |",
            "|---|---|---|---|---|",
        ]
        for r, x in central:
            n = r.central_counts
            counts = "- | - | -" if n is None else f"{n.sampled} | {n.aggregated} | {n.clipped}"
            lines.append(f"| {r.server_round} | {counts} | {x.epsilon:.4f} |")
        lines.append("")
    lines += [
        f"![privacy]({plot_name})",
        "",
        "Not covered by these ε: evaluation metrics and training losses sent to the server "
        "(aggregates, not noised); hyperparameter tuning; the silos' population sizes (used as "
        "public FedAvg weights). The Gaussian noise comes from torch's Mersenne Twister seeded "
        "from OS entropy, not a cryptographically secure generator.",
        "",
    ]
    return "\n".join(lines)
