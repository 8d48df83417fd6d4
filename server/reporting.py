"""The run directory: resolved config, per-round metrics, checkpoints, report."""

from __future__ import annotations

import json
import math
import os
import platform
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from common.errors import ConfigError
from common.storage import (
    atomic_write_bytes,
    atomic_write_json,
    load_arrays,
    save_arrays,
)
from server.ledger import RunLedgers

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.json"
REPORT_FILE = "report.md"
PLOT_FILE = "metrics.png"
PRIVACY_PLOT_FILE = "privacy.png"
FINAL_CHECKPOINT = "final.npz"
INITIAL_CHECKPOINT = "initial.npz"
CENTRAL_CANARIES = "central-canaries.json"  # canary clients' cosines (one-shot audit)  # the shared model before round 1 (audits compare with it)


def default_run_dir(dataset: str) -> Path:
    """``runs/<UTC time>-<dataset>`` under the working directory."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path.cwd() / "runs" / f"{stamp}-{dataset}"


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    out = {"python": platform.python_version()}
    for dist in ("flwr", "torch", "numpy", "opacus", "dp-accounting"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """What happened in one round, as written to ``metrics.jsonl``."""

    server_round: int
    seconds: float
    train: Mapping[str, float]
    evaluate: Mapping[str, float]
    bytes_sent: int
    bytes_received: int
    missing_nodes: tuple[int, ...]
    rejected: tuple[tuple[int, str], ...]
    privacy: tuple[Mapping[str, Any], ...] = ()  # per-silo local-DP summaries
    central: Mapping[str, Any] | None = None  # server's central-DP summary

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (NaN becomes null)."""
        return {
            "round": self.server_round,
            "seconds": round(self.seconds, 4),
            "train": _clean(self.train),
            "evaluate": _clean(self.evaluate),
            "bytes-sent": self.bytes_sent,
            "bytes-received": self.bytes_received,
            "missing-nodes": list(self.missing_nodes),
            "rejected": [{"node": n, "reason": r} for n, r in self.rejected],
            "privacy": [dict(e) for e in self.privacy],
            "central-privacy": None if self.central is None else dict(self.central),
        }


def _clean(values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and math.isnan(v) else v)
        for k, v in values.items()
        if not isinstance(v, list)
    }


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a resumed run continues: its id, last completed round and shared model."""

    run_uid: str
    last_round: int
    arrays: ArrayRecord


class RunRecorder:
    """Writes one run's directory; every file is written atomically."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.rounds: list[dict[str, Any]] = []
        self.ledgers: RunLedgers | None = None  # set by start() / resume()
        self.run_uid = ""

    def start(self, run_config: Mapping[str, Any]) -> None:
        """Create the directory and write the resolved config with library versions.

        Raises
        ------
        FileExistsError
            If the directory already holds a run's metrics (nothing is overwritten).
        """
        if (self.run_dir / METRICS_FILE).exists():
            raise FileExistsError(
                f"{self.run_dir} already holds a run ({METRICS_FILE} exists); "
                "choose another run directory"
            )
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.run_uid = uuid.uuid4().hex
        atomic_write_json(
            self.run_dir / CONFIG_FILE,
            {"run-config": dict(run_config), "run-uid": self.run_uid, "versions": library_versions()},
        )
        self.ledgers = RunLedgers(self.run_dir)

    def resume(self, run_config: Mapping[str, Any]) -> ResumePoint:
        """Reopen a run directory to continue after its last completed round.

        A round is complete once its line is in ``metrics.jsonl`` (its checkpoint and
        ledger commit are written before it). Settings that shape the model, data or
        privacy must equal the original run's; ``num-server-rounds`` may grow.

        Raises
        ------
        ConfigError
            If the directory is not a resumable run or its settings differ.
        """
        config_path = self.run_dir / CONFIG_FILE
        if not config_path.exists():
            raise ConfigError(f"resume: {config_path} not found: {self.run_dir} holds no fedrec run")
        try:
            saved = json.loads(config_path.read_text())
            original, self.run_uid = saved["run-config"], saved["run-uid"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ConfigError(f"resume: {config_path} is unreadable or predates resumable runs ({exc})") from None
        free = {"resume", "num-server-rounds", "run-dir", "state-root"}
        changed = sorted(k for k in set(original) | set(run_config) if k not in free and original.get(k) != run_config.get(k))
        if changed:
            diffs = ", ".join(f"{k}: {original.get(k)!r} -> {run_config.get(k)!r}" for k in changed)
            raise ConfigError(f"resume: settings differ from the run in {self.run_dir}: {diffs}")
        metrics = self.run_dir / METRICS_FILE
        text = metrics.read_text() if metrics.exists() else ""
        if text and not text.endswith("\n"):
            raise ConfigError(f"resume: {metrics} ends in an incomplete line (interrupted write); inspect it")
        for number, line in enumerate(text.splitlines(), 1):
            try:
                self.rounds.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"resume: {metrics}, line {number}: not valid JSON") from None
        last = int(self.rounds[-1]["round"]) if self.rounds else 0
        path = self.run_dir / "checkpoints" / f"round-{last:04d}.npz" if last else self.run_dir / INITIAL_CHECKPOINT
        if not path.exists():
            raise ConfigError(f"resume: checkpoint {path} of the last completed round {last} is missing")
        self.ledgers = RunLedgers(self.run_dir)
        return ResumePoint(self.run_uid, last, load_arrays(path))

    def record_round(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        """Append the round's metrics (synced) and checkpoint the shared model."""
        # Order matters for resume: checkpoint and ledger commit first; the metrics line
        # marks the round complete; state.json last.
        save_arrays(self.run_dir / "checkpoints" / f"round-{record.server_round:04d}.npz", arrays)
        state: dict[str, Any] = {"last-completed-round": record.server_round}
        if self.ledgers is not None:
            self.ledgers.commit_round(record.server_round)
            state["ledger"] = self.ledgers.anchor()
        line = record.to_json()
        self.rounds.append(line)
        with (self.run_dir / METRICS_FILE).open("a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        atomic_write_json(self.run_dir / STATE_FILE, state)

    def finish(
        self,
        arrays: ArrayRecord,
        k: int,
        privacy_mode: str = "none",
        stop_reason: str | None = None,
    ) -> None:
        """Save the final model and write ``report.md`` with its plots."""
        save_arrays(self.run_dir / FINAL_CHECKPOINT, arrays)
        last = self.rounds[-1]["round"] if self.rounds else 0
        state: dict[str, Any] = {"last-completed-round": last, "finished": True, "stop-reason": stop_reason}
        if self.ledgers is not None:
            state["ledger"] = self.ledgers.anchor()
        atomic_write_json(self.run_dir / STATE_FILE, state)
        plot_rounds(self.rounds, self.run_dir / PLOT_FILE, k)
        text = render_report(self.rounds, k)
        if stop_reason:
            text += f"\n**The run stopped early:** {stop_reason}.\n"
        if privacy_mode != "none":
            plot_privacy(self.rounds, self.run_dir / PRIVACY_PLOT_FILE)
            text += "\n" + render_privacy(self.rounds, privacy_mode)
        atomic_write_bytes(self.run_dir / REPORT_FILE, text.encode())


def plot_rounds(rounds: list[dict[str, Any]], path: Path, k: int) -> None:
    """HR@K, NDCG@K (validation and test) and training loss per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    evaluated = [r for r in rounds if r["evaluate"]]
    xs = [r["round"] for r in evaluated]
    for key, style in ((f"test-hr@{k}", "-o"), (f"test-ndcg@{k}", "-s"), (f"val-hr@{k}", "--")):
        left.plot(xs, [r["evaluate"].get(key) for r in evaluated], style, label=key)
    left.set_xlabel("round")
    left.set_title("ranking quality (sampled protocol)")
    left.legend()
    right.plot([r["round"] for r in rounds], [r["train"].get("train-loss") for r in rounds], "-o")
    right.set_xlabel("round")
    right.set_title("training loss (example-weighted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best_round(rounds: list[dict[str, Any]], k: int) -> dict[str, Any] | None:
    """The evaluated round with the highest validation HR@K (first on ties)."""
    scored = [r for r in rounds if r["evaluate"].get(f"val-hr@{k}") is not None]
    return max(scored, key=lambda r: r["evaluate"][f"val-hr@{k}"]) if scored else None


def render_report(rounds: list[dict[str, Any]], k: int) -> str:
    """Markdown report: headline metrics, per-round table, traffic."""
    lines = ["# fedrec run report", ""]
    final = next((r for r in reversed(rounds) if r["evaluate"]), None)
    best = best_round(rounds, k)
    if final is not None and best is not None:
        lines += [
            "| | round | test HR@{k} | test NDCG@{k} | val HR@{k} |".format(k=k),
            "|---|---|---|---|---|",
        ]
        for label, r in (("final round", final), ("best validation round", best)):
            e = r["evaluate"]
            lines.append(
                f"| {label} | {r['round']} | {_fmt(e.get(f'test-hr@{k}'))} | "
                f"{_fmt(e.get(f'test-ndcg@{k}'))} | {_fmt(e.get(f'val-hr@{k}'))} |"
            )
        lines += [
            "",
            "Sampled protocol: the held-out item ranked among 99 sampled items the user "
            "never interacted with; ties count against it. Hyperparameters (including "
            "the round) are chosen on validation; test is reported.",
            "",
        ]
    lines += [f"![metrics]({PLOT_FILE})", "", "## Rounds", ""]
    keys = [f"val-hr@{k}", f"test-hr@{k}", f"test-ndcg@{k}"]
    full = sorted({key for r in rounds for key in r["evaluate"] if key.startswith("test-full-")})
    extra = [f"coverage@{k}", f"arp@{k}", f"test-hr@{k}-gap-least-most-active"]
    header = ["round", "train loss", *keys, *full, *extra, "seconds", "bytes sent", "bytes received", "missing", "rejected"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rounds:
        e = r["evaluate"]
        cells = [
            str(r["round"]),
            _fmt(r["train"].get("train-loss")),
            *(_fmt(e.get(key)) for key in [*keys, *full, *extra]),
            f"{r['seconds']:.2f}",
            f"{r['bytes-sent']:,}",
            f"{r['bytes-received']:,}",
            ", ".join(map(str, r["missing-nodes"])) or "-",
            "; ".join(f"node {x['node']}: {x['reason']}" for x in r["rejected"]) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Bytes are message payloads (arrays, metric and config values), without "
        "protocol framing. Evaluation metrics are aggregates of per-silo sums; they "
        "are not differentially private.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def silo_epsilons(rounds: list[dict[str, Any]]) -> dict[int, list[tuple[int, float, bool]]]:
    """Per silo: (round, ε after the round, trained?) for every round it replied."""
    out: dict[int, list[tuple[int, float, bool]]] = {}
    for r in rounds:
        for e in r.get("privacy", []):
            out.setdefault(int(e["partition-id"]), []).append((r["round"], e["epsilon"], e["trained"]))
    return dict(sorted(out.items()))


def plot_privacy(rounds: list[dict[str, Any]], path: Path) -> None:
    """ε per round: one line per silo (local DP) and one for the server (central DP)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for silo, points in silo_epsilons(rounds).items():
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", ms=3, label=f"silo {silo} (unit: user/interaction)")
        declined = [p for p in points if not p[2]]
        if declined:
            ax.plot([p[0] for p in declined], [p[1] for p in declined], "x", color="red")
    central = [(r["round"], r["central-privacy"]["epsilon"]) for r in rounds if r.get("central-privacy")]
    if central:
        ax.plot(*zip(*central, strict=True), "-s", color="black", label="server, central DP (unit: silo)")
    ax.set_xlabel("round")
    ax.set_ylabel("ε (PLD, at each line's δ)")
    ax.set_title("privacy spent per round (x = budget reached, round declined)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_privacy(rounds: list[dict[str, Any]], mode: str) -> str:
    """The report's privacy section: per-silo ε per round, mechanism, budget events, scope."""
    lines = ["## Privacy", "", f"Mode: **{mode}**.", ""]
    per_silo = silo_epsilons(rounds)
    latest: dict[int, dict[str, Any]] = {}
    for r in rounds:
        for e in r.get("privacy", []):
            latest[int(e["partition-id"])] = e
    if latest:
        any_e = next(iter(latest.values()))
        unit = any_e["unit"]
        relation = (
            "add/remove one user with all of their interactions"
            if unit == "user"
            else "add/remove one interaction"
        )
        lines += [
            "### Local DP (DP-SGD in each silo)",
            "",
            f"Unit of privacy: **{unit}** (neighbouring data sets: {relation}). "
            "Mechanism: Poisson-subsampled Gaussian (DP-SGD with per-sample clipping), "
            f"composed over every step of every round with the {any_e['accountant'].upper()} "
            "accountant of dp-accounting.",
            "",
            "| silo | units N | δ | σ | q | clip C | rounds trained | steps | ε | budget |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for silo, e in sorted(latest.items()):
            lines.append(
                f"| {silo} | {e['population']} | {e['delta']:.2e} | {e['noise-multiplier']:.4f} | "
                f"{e['sample-rate']:.4f} | {e['clip']:g} | {e['rounds-trained']} | {e['total-steps']} | "
                f"{e['epsilon']:.4f} | {e['target-epsilon']:g} |"
            )
        silos = sorted(per_silo)
        lines += ["", "ε after each round (— = did not reply; * = declined):", ""]
        lines += ["| round | " + " | ".join(f"silo {s}" for s in silos) + " | max |", "|---" * (len(silos) + 2) + "|"]
        for r in rounds:
            by_silo = {int(e["partition-id"]): e for e in r.get("privacy", [])}
            cells = [
                "—" if s not in by_silo else f"{by_silo[s]['epsilon']:.4f}{'' if by_silo[s]['trained'] else '*'}"
                for s in silos
            ]
            eps = [e["epsilon"] for e in by_silo.values()]
            lines.append(f"| {r['round']} | " + " | ".join(cells) + f" | {max(eps) if eps else 0:.4f} |")
        events, stopped = [], set()
        for r in rounds:  # the first decline of each silo
            for e in sorted(r.get("privacy", []), key=lambda e: e["partition-id"]):
                silo = int(e["partition-id"])
                if not e["trained"] and silo not in stopped:
                    stopped.add(silo)
                    events.append(
                        f"- silo {silo} stopped at round {r['round']}: ε spent {e['epsilon']:.4f}, "
                        f"one more round would reach {e['epsilon-if-trained']:.4f} > budget {e['target-epsilon']:g}"
                    )
        lines += ["", "Budget events:", "", *(events or ["- none: no silo reached its budget"]), ""]
        if unit == "user":
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
    central = [r["central-privacy"] for r in rounds if r.get("central-privacy")]
    if central:
        c = central[-1]
        lines += [
            "### Central DP (DP-FedAvg on the server)",
            "",
            "Unit of privacy: **one silo** (add/remove a silo's whole update). Each round a "
            "silo is included with probability q; each update is clipped to S; Gaussian noise "
            f"of std z·S is added to the sum. N = {c['population']} silos, q = {c['sample-rate']:g}, "
            f"z = {c['noise-multiplier']:.4f}, S = {c['clip']:g}, δ = {c['delta']:.2e}, "
            f"accountant {c['accountant'].upper()}.",
            "",
            "| round | silos sampled | aggregated | clipped | ε |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {x['round']} | {x['sampled']} | {x['aggregated']} | {x['clipped']} | {x['epsilon']:.4f} |"
            for x in central
        ]
        lines.append("")
    lines += [
        f"![privacy]({PRIVACY_PLOT_FILE})",
        "",
        "Not covered by these ε: evaluation metrics and training losses sent to the server "
        "(aggregates, not noised); hyperparameter tuning; the silos' population sizes (used as "
        "public FedAvg weights). The Gaussian noise comes from torch's Mersenne Twister seeded "
        "from OS entropy, not a cryptographically secure generator.",
        "",
    ]
    return "\n".join(lines)
