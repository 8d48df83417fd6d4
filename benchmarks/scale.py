"""Many-client simulation cost: CPU ms per client-round of the whole process tree, and its peak memory.

    python -m benchmarks.scale --clients 1000 --clients 10000 --rounds 3 --per-node 500 --per-node 1000

For each N (every user of an N-user synthetic set is a by-user client; MF d=32,
1000 items, one local epoch, training rounds only: ``strategy.fraction-evaluate = 0``)
it runs, each as a child process tree of this one:

* **pure PyTorch** (the floor): a loop over the clients in one process doing the same
  local training as a fedrec client (global model copied in, a fresh Adam, one
  epoch of batches of positives + 4 sampled negatives, BCE + L2, weighted sum of the
  results), no framework;
* **fedrec in-process**: ``simulations.inprocess`` (the real ClientApp/ServerApp, every
  message through Flower's protobuf serde), ``simulation.clients-per-node = K``;
* **fedrec on Flower's runtime**: ``fedrec simulate`` (SuperLink, Flower's Ray
  simulation), same K;
* **bare Flower ClientApp**: a no-op ClientApp (replies with the arrays it got, 33k
  floats = MF's shared model) on Flower's runtime, with ⌈N/K⌉ nodes (the runtime's
  floor for the packed layout) and, with ``--bare-per-client``, one node per client.

CPU time is the user + system time of every process of the child's tree: this
process makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``), so daemons
that Ray and Flower detach are re-parented to it and stay in its tree. A thread
samples the tree every 0.25 s: CPU = Σ over live descendants of /proc utime + stime
+ cutime + cstime, plus ``getrusage(RUSAGE_CHILDREN)`` of what this process reaped;
memory = Σ PSS (and Σ RSS). It notes the CPU whenever the run's ``metrics.jsonl``
gains a line (a round ended). **Marginal CPU ms per client-round** = CPU between
the end of round 1 and the end of the last round / (N × (rounds − 1)): start-up,
imports, data loading and round 1's one-off work (nodes loading their users)
are left out. The **total** (everything, reaped at the end, / (N × rounds)) is
shown too. Peak memory is the largest sampled sum of the tree's PSS.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
PAGE = os.sysconf("SC_PAGE_SIZE")

FEDREC = {
    "data.partition": "by-user",
    "data.synthetic.num-items": 1000,
    "eval.full-ranking": False,
    "strategy.fraction-evaluate": 0.0,
    "strategy.aggregator": "fedavg",
    "strategy.norm-action": "none",
    "strategy.reject-opposed": False,
    "strategy.min-nodes": 1,
}


# ---------------------------------------------------------------- process-tree accounting
def become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def descendants(root: int) -> list[int]:
    """PIDs of every live descendant of ``root`` (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


TICK = os.sysconf("SC_CLK_TCK")


def tree_sample(root: int) -> tuple[float, int, int]:
    """(CPU seconds incl. reaped children, PSS bytes, RSS bytes) summed over ``root``'s live descendants."""
    cpu, pss, rss = 0.0, 0, 0
    for pid in descendants(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            cpu += sum(int(x) for x in fields[11:15]) / TICK  # utime stime cutime cstime
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            continue
    return cpu, pss, rss


class TreeMonitor:
    """Samples this process's descendants in a thread: peak PSS/RSS, and CPU at each new line of ``rounds_file``."""

    def __init__(self, rounds_file: Path) -> None:
        self.rounds_file = rounds_file
        self.pss = self.rss = 0
        self.at_round: dict[int, float] = {}  # rounds done -> tree CPU seconds when first seen
        self.wall_at_round: dict[int, float] = {}  # rounds done -> perf_counter when first seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(0.25):
            cpu, pss, rss = tree_sample(me)
            self.pss, self.rss = max(self.pss, pss), max(self.rss, rss)
            try:
                done = len(self.rounds_file.read_text().splitlines())
            except OSError:
                continue
            if done and done not in self.at_round:
                self.at_round[done] = cpu + children_cpu()
                self.wall_at_round[done] = time.perf_counter()

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def children_cpu() -> float:
    """User + system seconds of every reaped descendant so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def reap_all(grace: float = 120.0) -> list[int]:
    """Wait for every descendant to exit (reaping orphans too); kill what is left after ``grace`` s."""
    deadline = time.monotonic() + grace
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return []
        if pid:
            continue
        if time.monotonic() > deadline:
            left = descendants(os.getpid())
            for p in left:  # started by this benchmark's child tree
                try:
                    os.kill(p, 9)
                except ProcessLookupError:
                    pass
            try:
                while True:
                    os.waitpid(-1, 0)
            except ChildProcessError:
                return left
        time.sleep(0.1)


@dataclass(frozen=True, slots=True)
class Measured:
    """One child process tree: CPU seconds, wall seconds, peak memory."""

    cpu: float
    wall: float
    pss: int
    rss: int
    at_round: dict[int, float]  # rounds done -> CPU seconds of the tree so far
    wall_at_round: dict[int, float] | None = None  # rounds done -> wall seconds since the start


def measure(cmd: list[str], rounds_file: Path) -> Measured:
    """Run ``cmd`` and every process it starts to the end; their CPU time (also per round) and peak memory."""
    before = children_cpu()
    start = time.perf_counter()
    with TreeMonitor(rounds_file) as peak:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        left = reap_all()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if left:
        print(f"note: killed {len(left)} processes still running {120}s after {cmd[2:4]}", file=sys.stderr)
    walls = {r: w - start for r, w in peak.wall_at_round.items()}
    at_round = {r: c - before for r, c in peak.at_round.items()}
    return Measured(children_cpu() - before, wall, peak.pss, peak.rss, at_round, walls)


# ---------------------------------------------------------------- the children
def run_floor(n: int, rounds: int, run_dir: str) -> None:
    """Pure PyTorch: every client's local training in one loop, weighted sum into the next global model."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from common.config import AppConfig
    from common.data.pipeline import load_interactions, split_interactions
    from common.run_config import load_default_run_config, merge_overrides

    torch.set_num_threads(1)
    cfg = AppConfig.from_run_config(merge_overrides(load_default_run_config(), config(n, rounds, 1, "")))
    split = split_interactions(cfg.data, cfg.seed, load_interactions(cfg.data, cfg.seed)).split
    order = np.argsort(split.train_user, kind="stable")
    items_by_row, starts = split.train_item[order], np.searchsorted(split.train_user[order], np.arange(n + 1))
    t, num_items, dim = cfg.train, split.num_items, cfg.model.dim
    torch.manual_seed(0)
    q = torch.randn(num_items, dim) * 0.1
    qb = torch.zeros(num_items, 1)
    g = torch.zeros(1)
    user = torch.randn(n, dim) * 0.1
    user_b = torch.zeros(n, 1)
    P, PB = torch.nn.Embedding(1, dim), torch.nn.Embedding(1, 1)
    Q, QB = torch.nn.Embedding(num_items, dim), torch.nn.Embedding(num_items, 1)
    G = torch.nn.Parameter(torch.zeros(1))
    labels = torch.zeros(t.batch_size, 1 + t.num_negatives)
    labels[:, 0] = 1.0
    for r in range(rounds):
        sums = [torch.zeros(num_items, dim, dtype=torch.float64), torch.zeros(num_items, 1, dtype=torch.float64),
                torch.zeros(1, dtype=torch.float64)]
        weight = 0
        for u in range(n):
            own = items_by_row[starts[u] : starts[u + 1]]
            if len(own) == 0:
                continue
            with torch.no_grad():
                P.weight.copy_(user[u : u + 1])
                PB.weight.copy_(user_b[u : u + 1])
                Q.weight.copy_(q)
                QB.weight.copy_(qb)
                G.copy_(g)
            params = [P.weight, PB.weight, Q.weight, QB.weight, G]
            opt = torch.optim.Adam(params, lr=t.lr)
            rng = np.random.default_rng([r, u])
            known = np.sort(own)
            for _ in range(t.local_epochs):
                pos = own[rng.permutation(len(own))]
                neg = rng.integers(0, num_items, size=(len(own), t.num_negatives))
                while (bad := known[np.searchsorted(known, neg).clip(max=len(known) - 1)] == neg).any():
                    neg[bad] = rng.integers(0, num_items, size=int(bad.sum()))
                batch_items = torch.from_numpy(np.concatenate([pos[:, None], neg], axis=1))
                zeros = torch.zeros(len(own), dtype=torch.long)
                for lo in range(0, len(own), t.batch_size):
                    it, us = batch_items[lo : lo + t.batch_size], zeros[lo : lo + t.batch_size]
                    p, qi = P(us), Q(it)
                    logits = torch.einsum("bd,btd->bt", p, qi) + PB(us) + QB(it).squeeze(-1) + G
                    loss = F.binary_cross_entropy_with_logits(logits, labels[: len(it)], reduction="none").sum(-1)
                    loss = loss + t.l2 * (p.pow(2).sum(-1) + qi.pow(2).sum(-1).sum(-1))
                    opt.zero_grad(set_to_none=True)
                    loss.mean().backward()
                    opt.step()
            with torch.no_grad():
                user[u : u + 1] = P.weight
                user_b[u : u + 1] = PB.weight
                for acc, p_ in zip(sums, (Q.weight, QB.weight, G), strict=True):
                    acc.add_(p_, alpha=float(len(own)))
            weight += len(own)
        q, qb, g = (s.div(weight).float() for s in sums)
        with (Path(run_dir) / "metrics.jsonl").open("a") as f:  # a round ended (the parent notes the CPU)
            f.write(json.dumps({"round": r + 1, "clients": n, "weight": weight}) + "\n")


def run_inprocess_child(n: int, rounds: int, per_node: int, run_dir: str) -> None:
    """fedrec's own runtime, no Ray: the real ClientApp and ServerApp over InProcessGrid."""
    import torch

    from client.packed import num_nodes
    from common.run_config import load_default_run_config, merge_overrides
    from simulations.inprocess import run_inprocess

    torch.set_num_threads(1)
    run_config = merge_overrides(load_default_run_config(), config(n, rounds, per_node, run_dir))
    run_inprocess(run_config, num_nodes(n, per_node))


def config(n: int, rounds: int, per_node: int, run_dir: str) -> dict[str, object]:
    """The run-config overrides of one fedrec run."""
    out: dict[str, object] = {
        **FEDREC,
        "num-server-rounds": rounds,
        "data.synthetic.num-users": n,
        "simulation.clients-per-node": per_node,
    }
    if run_dir:
        out["run-dir"] = run_dir
    return out


# ---------------------------------------------------------------- the parent
def fedrec_simulate_cmd(n: int, rounds: int, per_node: int, run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "cli.main", "simulate", "--silos", str(n), "--run-dir", str(run_dir)]
    for key, value in config(n, rounds, per_node, "").items():
        cmd += ["-c", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return cmd


def bare_cmd(nodes: int, rounds: int, work: Path) -> list[str]:
    """A no-op ClientApp on Flower's simulation runtime with ``nodes`` nodes (one train exchange per round)."""
    script = f"""
import sys
from pathlib import Path
from benchmarks.deploy_rounds import bare_app
from deployment.launcher import flwr_run, superlink
work = Path({str(work)!r})
app = bare_app(work / "app")
with superlink(work / "flower", simulation=True) as link:
    rc = flwr_run(link.flwr_home, app_dir=app, run_config={{"num-server-rounds": {rounds}, "run-dir": str(work),
        "min-nodes": {nodes}, "exchanges": 1, "payload-floats": 33001}},
        federation_config="num-supernodes={nodes} client-resources-num-cpus=1", log=work / "flwr.log",
        on_line=lambda line: None)
sys.exit(rc)
"""
    return [sys.executable, "-c", script]


def child_cmd(kind: str, n: int, rounds: int, per_node: int, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.scale", "--child", kind, "--clients", str(n), "--rounds", str(rounds),
            "--per-node", str(per_node), "--run-dir", str(run_dir)]


@dataclass(frozen=True, slots=True)
class Row:
    """One configuration's run of ``rounds`` rounds."""

    name: str
    run: Measured
    n: int
    rounds: int

    @property
    def marginal_ms(self) -> float:
        """CPU ms per client-round between the end of round 1 and the end of the last.

        Rounds shorter than the 0.25 s sampling can be missed: then from the first
        round seen (NaN when only the last was seen).
        """
        seen = sorted(r for r in self.run.at_round if r < self.rounds)
        last = self.run.at_round.get(self.rounds)
        if not seen or last is None:
            return float("nan")
        return 1000 * (last - self.run.at_round[seen[0]]) / (self.n * (self.rounds - seen[0]))

    @property
    def total_ms(self) -> float:
        """All CPU up to the end of the last round (or, unseen, all reaped CPU) per client-round.

        The sample at the last round is used because a process whose parent ignores
        SIGCHLD is reaped by the kernel and its time never reaches any ``cutime``.
        """
        cpu = self.run.at_round.get(self.rounds, self.run.cpu)
        return 1000 * max(cpu, self.run.cpu) / (self.n * self.rounds)

    @property
    def cores_busy(self) -> float:
        """CPU seconds per wall second of the tree after round 1 (how many cores it kept busy)."""
        walls = self.run.wall_at_round or {}
        first, last = walls.get(1), walls.get(self.rounds)
        if first is None or last is None or last <= first:
            return float("nan")
        return (self.run.at_round[self.rounds] - self.run.at_round[1]) / (last - first)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    """Measure every configuration for every N and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, action="append", help="N (repeatable; default 1000 and 10000)")
    parser.add_argument("--per-node", type=int, action="append", help="K for each N (repeatable, same order)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bare-per-client", type=int, default=1000, metavar="MAX_N",
                        help="also a bare ClientApp with one node per client for N <= MAX_N (slow: Flower's "
                        "per-node cost; 0 = never; default 1000)")
    parser.add_argument("--only", action="append", help="floor | inprocess | flower | bare (repeatable; default all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        n, per_node = args.clients[0], args.per_node[0]
        if args.child == "floor":
            Path(args.run_dir).mkdir(parents=True, exist_ok=True)
            run_floor(n, args.rounds, args.run_dir)
        else:
            run_inprocess_child(n, args.rounds, per_node, args.run_dir)
        return
    sizes = args.clients or [1000, 10000]
    ks = args.per_node or [min(n, 1000) // 2 if n <= 1000 else 1000 for n in sizes]
    if len(ks) != len(sizes):
        sys.exit("--per-node: give one K per --clients")
    if args.rounds < 2:
        sys.exit("--rounds must be >= 2 (the marginal cost is measured after round 1)")
    only = set(args.only or ["floor", "inprocess", "flower", "bare"])
    become_subreaper()
    work = Path(tempfile.mkdtemp(prefix="fedrec-scale-"))
    rows: list[Row] = []
    print(f"load at start: {load()}", flush=True)
    for n, k in zip(sizes, ks, strict=True):
        nodes = -(-n // k)
        plan: list[tuple[str, str, object]] = []
        if "floor" in only:
            plan.append(("pure PyTorch loop (floor)", "floor", None))
        if "inprocess" in only:
            plan.append((f"fedrec in-process, K={k} ({nodes} nodes)", "inprocess", None))
        if "flower" in only:
            plan.append((f"fedrec on Flower's runtime (`fedrec simulate`), K={k} ({nodes} nodes)", "flower", None))
        if "bare" in only:
            plan.append((f"bare Flower ClientApp, {nodes} nodes", "bare", nodes))
            if n <= args.bare_per_client:
                plan.append((f"bare Flower ClientApp, {n} nodes (one per client)", "bare", n))
        for name, kind, extra in plan:
            d = work / f"{kind}-{n}-{extra}"
            if kind == "flower":
                cmd = fedrec_simulate_cmd(n, args.rounds, k, d)
            elif kind == "bare":
                assert isinstance(extra, int)
                d.mkdir(parents=True)
                cmd = bare_cmd(extra, args.rounds, d)
            else:
                cmd = child_cmd(kind, n, args.rounds, k, d)
            m = measure(cmd, d / "metrics.jsonl")
            rows.append(Row(name, m, n, args.rounds))
            print(f"  {n} clients, {name}: CPU {m.cpu:.1f} s, after each round "
                  f"{ {r: round(c, 1) for r, c in sorted(m.at_round.items())} }, wall {m.wall:.1f} s, "
                  f"peak PSS {m.pss / 2**30:.2f} GiB, marginal {rows[-1].marginal_ms:.2f} ms (load {load()})", flush=True)
    print(f"\nload at end: {load()}\n")
    print_table(rows)


def print_table(rows: list[Row]) -> None:
    """The markdown table: marginal and total CPU ms per client-round, overhead over the floor, peak memory."""
    floors = {r.n: r.marginal_ms for r in rows if r.name.startswith("pure PyTorch")}
    print("| clients | runtime | CPU ms per client-round (marginal) | overhead over the floor, ms | "
          "CPU ms per client-round (total, incl. start-up) | cores busy after round 1 | wall s | peak PSS of the tree | peak RSS sum |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        floor = floors.get(r.n)
        over = "—" if floor is None or r.name.startswith("pure PyTorch") else f"{r.marginal_ms - floor:+.2f}"
        print(f"| {r.n:,} | {r.name} | {r.marginal_ms:.2f} | {over} | {r.total_ms:.2f} | {r.cores_busy:.2f} | {r.run.wall:.0f} | "
              f"{r.run.pss / 2**30:.2f} GiB | {r.run.rss / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
