"""What the release policy keeps in each silo: ``silo-report.jsonl``, and pooling it.

Under DP a silo keeps its training loss/seconds and its evaluation sums in its own
state directory (:mod:`common.privacy.release`). In a deployment each silo reads
only its own file. A *simulation* holds every silo, so its experimenter may pool
them — :func:`pooled_evaluation` does that for benchmarks and ``fedrec simulate``;
the numbers it returns were never sent to the server.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

REPORT_NAME = "silo-report.jsonl"
#: Rankings whose sums each silo computes beside the model's on the same candidates: its own
#: popularity counts (``popularity-``) and, under distributed DP, the released DP histogram
#: (``dp-popularity-``).
RANKINGS = ("popularity-val", "popularity-test", "dp-popularity-val", "dp-popularity-test")


def report_files(state_root: Path) -> list[Path]:
    """Every silo's report under ``state_root`` (``silo-K/<run uid>/silo-report.jsonl``)."""
    return sorted(state_root.glob(f"silo-*/*/{REPORT_NAME}"))


def read_report(path: Path) -> list[dict[str, Any]]:
    """One silo's report lines.

    Raises
    ------
    ValueError
        Naming the file and line of a line that is not a JSON object.
    """
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        out.append(value)
    return out


def pooled_evaluation(state_root: Path, k: int) -> dict[int, dict[str, float]]:
    """Per round: every silo's evaluation sums added up, as metrics (HR, NDCG, recall).

    A round's entry pools the silos that evaluated it; ``silos`` says how many.
    """
    sums: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for path in report_files(state_root):
        for line in read_report(path):
            if line.get("kind") != "evaluation":
                continue
            bucket = sums[int(line["round"])]
            bucket["silos"] += 1
            for key, value in line.items():
                if key not in ("round", "kind") and isinstance(value, (int, float)):
                    bucket[key] += float(value)
    out: dict[int, dict[str, float]] = {}
    for rnd, s in sorted(sums.items()):
        metrics = {"silos": s["silos"]}
        for phase in ("val", "test", "personalized-val", "personalized-test", *RANKINGS):
            # a ranking's sums (popularity-, dp-popularity-) are over the model's users and candidates
            users = s.get(f"{phase}-users", s.get(f"{phase.rsplit('-', 1)[-1]}-users", 0.0))
            for name in (f"hits@{k}", f"ndcg@{k}"):
                total = s.get(f"{phase}-{name}")
                if total is not None:
                    metrics[f"{phase}-{name.replace('hits', 'hr')}"] = total / users if users else math.nan
        users = s.get("test-users", 0.0)
        for key, value in s.items():
            if key.startswith("test-full-"):
                metrics[key] = value / users if users else math.nan
        out[rnd] = metrics
    return out
