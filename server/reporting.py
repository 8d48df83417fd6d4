"""The run directory: resolved config, per-round metrics, checkpoints, report."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from server.checkpoint import atomic_write_bytes, atomic_write_json, save_arrays

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.json"
REPORT_FILE = "report.md"
PLOT_FILE = "metrics.png"
FINAL_CHECKPOINT = "final.npz"


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
        }


def _clean(values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and math.isnan(v) else v)
        for k, v in values.items()
        if not isinstance(v, list)
    }


class RunRecorder:
    """Writes one run's directory; every file is written atomically."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.rounds: list[dict[str, Any]] = []

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
        atomic_write_json(
            self.run_dir / CONFIG_FILE,
            {"run-config": dict(run_config), "versions": library_versions()},
        )

    def record_round(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        """Append the round's metrics (synced) and checkpoint the shared model."""
        line = record.to_json()
        self.rounds.append(line)
        with (self.run_dir / METRICS_FILE).open("a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        save_arrays(self.run_dir / "checkpoints" / f"round-{record.server_round:04d}.npz", arrays)
        atomic_write_json(self.run_dir / STATE_FILE, {"last-completed-round": record.server_round})

    def finish(self, arrays: ArrayRecord, k: int) -> None:
        """Save the final model and write ``report.md`` with its plot."""
        save_arrays(self.run_dir / FINAL_CHECKPOINT, arrays)
        plot_rounds(self.rounds, self.run_dir / PLOT_FILE, k)
        atomic_write_bytes(self.run_dir / REPORT_FILE, render_report(self.rounds, k).encode())


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
