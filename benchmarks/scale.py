"""Many-client simulation cost: seconds per round and peak memory, Ray vs in-process.

    python -m benchmarks.scale --clients 1000 --rounds 3

Runs the same by-user synthetic federation (every user is a client) twice:
through ``fedrec simulate`` on Flower's Ray runtime, and in-process over
:class:`simulations.inprocess.InProcessGrid` (the real ClientApp and ServerApp logic with
protobuf serialisation of every message, but no Ray). The difference per client and
round is the runtime's overhead; the in-process time is what fedrec itself costs.
Peak memory is the machine-wide rise of used memory (MemTotal - MemAvailable)
over the run, sampled every 0.2 s, so run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common.run_config import load_default_run_config, merge_overrides
from simulations.inprocess import run_inprocess


def used_memory_bytes() -> int:
    """MemTotal - MemAvailable from /proc/meminfo."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":")
        fields[name] = int(value.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


class PeakMemory:
    """Samples machine-wide used memory in a thread; ``peak_rise`` after stop."""

    def __init__(self) -> None:
        self.base = used_memory_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, used_memory_bytes())

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_rise(self) -> int:
        """Bytes above the level at start."""
        return self.peak - self.base


def round_seconds(run_dir: Path) -> list[float]:
    """Per-round wall time from a run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["seconds"] for line in lines]


def main() -> None:
    """Run both and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n, rounds = args.clients, args.rounds
    overrides = {
        "num-server-rounds": rounds,
        "data.partition": "by-user",
        "data.synthetic.num-users": n,
        "eval.full-ranking": False,
    }
    work = Path(tempfile.mkdtemp(prefix="fedrec-scale-"))

    ray_dir = work / "ray"
    cmd = [sys.executable, "-m", "cli.main", "simulate", "--silos", str(n), "--run-dir", str(ray_dir)]
    for key, value in overrides.items():
        cmd += ["-c", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    start = time.perf_counter()
    with PeakMemory() as ray_mem:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    ray_total = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"fedrec simulate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    ray_rounds = round_seconds(ray_dir)

    local_dir = work / "inprocess"
    config = merge_overrides(load_default_run_config(), {**overrides, "run-dir": str(local_dir)})
    start = time.perf_counter()
    with PeakMemory() as local_mem:
        run_inprocess(config, n)
    local_total = time.perf_counter() - start
    local_rounds = round_seconds(local_dir)

    def steady(xs: list[float]) -> float:
        rest = xs[1:] or xs  # round 1 includes loading data on every node
        return sum(rest) / len(rest)

    print(f"\n{n} clients (by-user, synthetic, MF d=32), {rounds} rounds; seconds per round "
          "(train + federated evaluation)\n")
    print("| runtime | round 1 s | later rounds s/round | ms per client-round (later) | total s | peak memory rise |")
    print("|---|---|---|---|---|---|")
    for name, xs, total, mem in (
        ("Flower simulation (Ray), `fedrec simulate`", ray_rounds, ray_total, ray_mem),
        ("in-process InProcessGrid (fedrec's own cost)", local_rounds, local_total, local_mem),
    ):
        print(f"| {name} | {xs[0]:.1f} | {steady(xs):.1f} | {1000 * steady(xs) / n:.1f} | "
              f"{total:.1f} | {mem.peak_rise / 2**30:.2f} GiB |")
    overhead = (steady(ray_rounds) - steady(local_rounds)) / n * 1000
    print(f"\nRay runtime overhead beyond fedrec's own work: {overhead:.1f} ms per client-round "
          "(each round sends a train and an evaluate message to every client).")


if __name__ == "__main__":
    main()
