"""benchmarks.scale: whole-tree CPU accounting (orphans included), per-round marginals, the floor's loop."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks import scale

REPO = Path(__file__).resolve().parents[2]


def test_marginal_is_the_cpu_after_round_one_per_client_round():
    m = scale.Measured(cpu=10.0, wall=1.0, pss=0, rss=0, at_round={1: 4.0, 2: 6.0, 3: 8.0})
    row = scale.Row("x", m, n=1000, rounds=3)
    assert row.marginal_ms == 2.0  # (8 - 4) s / (1000 clients x 2 rounds)
    assert abs(row.total_ms - 10.0 / 3) < 1e-12  # 10 s / 3000 client-rounds
    unseen = scale.Row("x", scale.Measured(1.0, 1.0, 0, 0, {1: 0.5}), n=10, rounds=3)
    assert unseen.marginal_ms != unseen.marginal_ms  # NaN: the last round was never seen


def test_an_orphaned_grandchilds_cpu_is_counted(tmp_path):
    """The command exits at once; a detached grandchild burns ~0.6 s of CPU and writes two round lines."""
    rounds = tmp_path / "metrics.jsonl"
    burn = textwrap.dedent(f"""
        import time
        from pathlib import Path
        def spin(seconds):
            end = time.process_time() + seconds
            while time.process_time() < end:
                pass
        Path({str(rounds)!r}).write_text("1\\n")
        time.sleep(0.6)
        spin(0.6)
        Path({str(rounds)!r}).write_text("1\\n2\\n")
        time.sleep(0.6)
    """)
    parent = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {burn!r}], start_new_session=True)"
    probe = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from benchmarks import scale
        scale.become_subreaper()
        m = scale.measure([sys.executable, "-c", {parent!r}], Path({str(rounds)!r}))
        print(json.dumps({{"cpu": m.cpu, "at_round": m.at_round}}))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["cpu"] >= 0.55  # the grandchild's 0.6 s spin, though its parent exited long before
    assert set(got["at_round"]) == {"1", "2"}
    assert got["at_round"]["2"] - got["at_round"]["1"] >= 0.5  # the spin lies between the two round lines


def test_the_floor_trains_every_client_and_marks_each_round(tmp_path):
    scale.run_floor(12, 2, str(tmp_path))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    assert lines[0]["clients"] == 12 and lines[0]["weight"] > 0


def test_fedrec_simulate_command_packs_clients():
    cmd = scale.fedrec_simulate_cmd(1000, 3, 500, Path("/tmp/x"))
    assert cmd[cmd.index("--silos") + 1] == "1000"
    assert "simulation.clients-per-node=500" in cmd
    assert "strategy.fraction-evaluate=0.0" in cmd and "strategy.reject-opposed=false" in cmd
