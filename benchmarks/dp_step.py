"""Cost of one DP-SGD step on an embedding recommender: fedrec vs Opacus vs non-private.

    python -m benchmarks.dp_step             # full table, ~10 min on 2 CPU cores
    python -m benchmarks.dp_step --markdown  # the same as a markdown table (README)
    python -m benchmarks.dp_step --models mf --items 3706 --steps 10
    python -m benchmarks.dp_step --interleave --methods plain-sparse,fedrec --steps 40  # ratios in one process
    python -m benchmarks.dp_step --interleave --markdown --steps 30 --models mf \
        --methods plain,plain-sparse,plain-sparse-closed-form,fedrec,fedrec-autograd  # where fedrec's speed comes from

What is measured
----------------
One optimizer step (forward, backward, per-sample clipping and noise where
private, parameter update) of MF or NeuMF (d = 64, NeuMF MLP 128-64-32) on a
batch of B = 1024 DP samples. One sample is one user with one positive and four
random negatives: ``users`` (B,), ``items`` (B, 5), binary cross-entropy with
label 1 on column 0 summed over the 5 columns, i.e. a per-sample loss of shape
(B,). Catalogues of 3,706 items (MovieLens-1M, 6,040 users), 100,000 and
1,000,000 items (10,000 users).

Methods (every cell of the table is one (model, catalogue, method)):

``plain``
    Non-private PyTorch: ``loss.mean().backward()`` and ``torch.optim.SGD`` with
    dense embedding gradients.
``plain-adam``
    The same with ``torch.optim.Adam``.
``plain-sparse``
    Non-private with ``nn.Embedding(sparse=True)`` and ``torch.optim.SGD``: sparse
    embedding gradients, the strongest non-private baseline. The fastest of the
    three non-private methods for a (model, catalogue) is the *best non-private*
    step; every method's ``× best non-private`` is its median step time divided by
    that one.
``plain-sparse-closed-form``
    ``plain-sparse`` with MF's score back-propagating through fedrec's closed-form
    gradient (:func:`common.models.closed_form_row_gradients`, as fedrec's DP step
    does) instead of autograd's ``einsum`` backward. Not a stock PyTorch step, so
    it is not a candidate for the best non-private step; fedrec's ratio to it is
    printed with the targets (it shows how much of fedrec's speed is that closed
    form, which a non-private step could use too). NeuMF has no closed form: there
    it is ``plain-sparse``.
``opacus-hooks``
    Opacus 1.6 ``PrivacyEngine.make_private(grad_sample_mode="hooks")``: per-sample
    gradients from hooks, flat clipping and Gaussian noise in ``DPOptimizer``.
    Opacus' embedding grad sampler materialises a (B × rows × d) tensor per table,
    so the cell is only run where that estimate (× a peak factor) stays below
    ``--hooks-max-gib``; otherwise it reads "skipped (would need ≈X GiB)".
``opacus-ghost``
    Opacus ghost clipping (``grad_sample_mode="ghost"`` with a criterion whose
    ``reduction="none"`` gives the (B,) per-sample loss): two backward passes,
    per-sample norms without per-sample gradients, dense noise on every parameter.
    Skipped where a step would exceed ``--max-step-s``.
``fedrec``
    :class:`common.privacy.dpsgd.SparseDPSGD`: sparse duplicate-aware per-sample
    clipping and lazy table noise (the default).
``fedrec-autograd``
    The same engine with ``closed_form=False``: MF's score back-propagates through
    autograd's ``einsum`` backward (batched matrix products).
``fedrec-dense-noise``
    The same engine with ``lazy=False``: every row of every noised table gets
    fresh noise each step, which is what lazy noise avoids at large catalogues.
    Skipped where a step would exceed ``--max-step-s``.

The Opacus baselines are set up as a plain Opacus user would: the user tables
are trainable and are clipped and noised together with everything else. In
fedrec the user tables are private to their silo (user-level DP): they are
updated with the user's own gradient and neither clipped nor noised, so fedrec's
step does strictly less noise work on them; this is the configuration fedrec
actually trains with. All private methods use σ = 1, C = 1, plain SGD, and the
same fixed-size batches (no Poisson sampling, so every method does the same
work each step).

Timing: CPU time of the process (``time.process_time``, so other jobs' load
mostly cancels out); 3 warm-up steps (1 if the first one takes over a second), then up to
``--steps`` measured steps, stopping early once ``--budget-s`` seconds of
measurement have passed (at least 3 steps); the median is reported. Peak extra
memory: each cell runs in a fresh subprocess (which also isolates crashes and
out-of-memory kills); it is the rise of the process' RSS high-water mark
(``ru_maxrss``) from just after the model is built to the end of the steps, so
it includes the optimizer's or DP engine's own state. Threads: ``--threads``
(default 1, which on a 2-core shared machine is faster and steadier at these
sizes than 2).

Targets (checked from the measured numbers after the table)
-----------------------------------------------------------
* MF: fedrec's step ≤ 1.3× the best non-private step (in practice plain-sparse)
  at the small catalogue (≤ 10,000 items) and ≤ 1.5× at larger catalogues (up to 1M items).
* NeuMF: fedrec's step ≤ 2× the best non-private step at every catalogue.
* With ``plain-sparse-closed-form`` in ``--methods``, fedrec's ratio to it is printed
  too (no target: it is the non-private step given fedrec's closed-form MF gradient).
* Memory O(B·d), never O(B·V·d): fedrec's peak extra memory stays within
  ``64 MiB + 4 × 4 bytes × B·(Σd_user + (1+T)·Σd_item + P_dense)``, four times
  the per-sample working set (the table rows a batch reads and the per-sample
  gradients of the P_dense non-embedding parameters), whatever the catalogue
  size V. The 64 MiB covers allocator slack and the lazy-noise step counters
  (8 bytes per row of each noised table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.functional import binary_cross_entropy_with_logits

from common.models import Recommender, build_model

ROOT = Path(__file__).resolve().parents[1]

METHODS = (
    "plain",
    "plain-adam",
    "plain-sparse",
    "plain-sparse-closed-form",
    "opacus-hooks",
    "opacus-ghost",
    "fedrec",
    "fedrec-autograd",
    "fedrec-dense-noise",
)
NON_PRIVATE = ("plain", "plain-adam", "plain-sparse")  # stock PyTorch steps: the "best non-private" is one of these
# Non-private, but with fedrec's closed-form MF score gradient: not a stock PyTorch step, so
# not a candidate for "best non-private"; fedrec's ratio to it is printed with the targets.
CLOSED_FORM_BASELINE = "plain-sparse-closed-form"
NOT_PRIVATE = (*NON_PRIVATE, CLOSED_FORM_BASELINE)
SLOW_SKIPPABLE = ("opacus-ghost", "fedrec-dense-noise")  # skipped above --max-step-s
NEGATIVES = 4  # one positive + NEGATIVES random items per sample
NEUMF_MLP = (128, 64, 32)
HOOKS_PEAK_FACTOR = 2.0  # opacus-hooks peak RSS / per-sample-gradient bytes (measured ≈1.9, MF, B=256)
SMALL_CATALOGUE = 10_000
MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class Cell:
    """One (method, model, catalogue) measurement."""

    method: str
    model: str
    items: int
    users: int
    dim: int = 64
    batch: int = 1024
    steps: int = 20
    threads: int = 1
    budget_s: float = 5.0
    max_step_s: float = 2.0
    hooks_max_gib: float = 6.0
    warmup: int = 3
    seed: int = 0


class Skip(Exception):
    """A cell that is not run, with the reason shown in the table."""


# --------------------------------------------------------------------------- cell
def users_for(items: int) -> int:
    """Number of users paired with a catalogue: MovieLens-1M's 6,040 for small ones."""
    return 6040 if items <= SMALL_CATALOGUE else 10_000


def table_widths(model: str, dim: int) -> tuple[dict[str, int], dict[str, int]]:
    """Widths of the (user, item) embedding tables of a model."""
    if model == "mf":
        return {"user_embedding": dim, "user_bias": 1}, {"item_embedding": dim, "item_bias": 1}
    mlp = NEUMF_MLP[0] // 2
    return {"user_gmf": dim, "user_mlp": mlp}, {"item_gmf": dim, "item_mlp": mlp}


def hooks_bytes(cell: Cell) -> float:
    """Estimated peak bytes of Opacus' per-sample embedding gradients (all tables trainable)."""
    user_w, item_w = table_widths(cell.model, cell.dim)
    per_sample = cell.users * sum(user_w.values()) + cell.items * sum(item_w.values())
    return cell.batch * per_sample * 4 * HOOKS_PEAK_FACTOR


def dense_parameters(model: str, dim: int) -> int:
    """Number of non-embedding parameters (MLP, output layer, global bias) of a model."""
    tiny = build_model(model, 1, 1, dim, NEUMF_MLP)
    return sum(p.numel() for m in tiny.modules() if not isinstance(m, nn.Embedding) for p in m.parameters(recurse=False))


def fedrec_memory_budget(cell: Cell) -> float:
    """O(B·d) budget for fedrec's extra memory: 64 MiB + 4× the per-sample working set."""
    user_w, item_w = table_widths(cell.model, cell.dim)
    per_sample = sum(user_w.values()) + (1 + NEGATIVES) * sum(item_w.values()) + dense_parameters(cell.model, cell.dim)
    return 64 * MIB + 4 * 4 * cell.batch * per_sample


class SampledBCELoss(nn.Module):
    """BCE summed over a sample's (positive, negatives) columns, reduced over samples.

    Opacus ghost clipping calls it with ``reduction="none"`` for the (B,) per-sample loss.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Loss of ``logits`` (B, 1+k) against ``labels`` (B, 1+k)."""
        per_sample = binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(1)
        if self.reduction == "none":
            return per_sample
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _prime_torch() -> None:
    """Run tiny versions of the ops used below so library start-up is not counted as step memory."""
    emb = torch.nn.Embedding(10, 4)
    lin = torch.nn.Linear(4, 1)
    out = lin(emb(torch.tensor([[1, 2]]))).sum()
    out.backward()
    torch.zeros(3, 4).index_add_(0, torch.tensor([0, 1]), torch.ones(2, 4))
    torch.unique(torch.tensor([3, 1, 3]), return_inverse=True)


def _make_step(cell: Cell, model: Recommender, labels: Tensor) -> Callable[[Tensor, Tensor], None]:
    """Build the optimizer / DP engine for ``cell.method``; return ``step(users, items)``."""

    def per_sample_bce(logits: Tensor) -> Tensor:
        return binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(1)

    lr = 0.05
    method = cell.method
    if method in NOT_PRIVATE:
        if method.startswith("plain-sparse"):
            for module in model.modules():
                if isinstance(module, nn.Embedding):
                    module.sparse = True
        opt = (
            torch.optim.Adam(model.parameters(), lr=1e-3)
            if method == "plain-adam"
            else torch.optim.SGD(model.parameters(), lr=lr)
        )

        def plain_step(users: Tensor, items: Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            per_sample_bce(model(users, items)).mean().backward()
            opt.step()

        if method == CLOSED_FORM_BASELINE:
            from common.models import closed_form_row_gradients

            def closed_form_step(users: Tensor, items: Tensor) -> None:
                with closed_form_row_gradients(model):
                    plain_step(users, items)

            return closed_form_step
        return plain_step

    if method in ("fedrec", "fedrec-autograd", "fedrec-dense-noise"):
        from common.privacy.dpsgd import SparseDPSGD

        engine = SparseDPSGD(
            model,
            noise_multiplier=1.0,
            clip=1.0,
            lr=lr,
            expected_batch_size=cell.batch,
            private_tables=model.user_tables,
            private_lr=lr,
            generator=torch.Generator().manual_seed(cell.seed),
            lazy=method != "fedrec-dense-noise",
            closed_form=method != "fedrec-autograd",
        )

        def loss(rows: dict[str, Tensor]) -> Tensor:
            return per_sample_bce(model.score_rows(rows))

        def fedrec_step(users: Tensor, items: Tensor) -> None:
            engine.step(users, items, loss)

        return fedrec_step

    if method in ("opacus-hooks", "opacus-ghost"):
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        if method == "opacus-hooks" and hooks_bytes(cell) > cell.hooks_max_gib * GIB:
            raise Skip(f"skipped (would need ≈{hooks_bytes(cell) / GIB:.0f} GiB)")
        # make_private wants a loader (for the sampling rate); batches are fed directly.
        loader = DataLoader(TensorDataset(torch.arange(cell.batch * 8)), batch_size=cell.batch)
        privacy = PrivacyEngine()
        common = {
            "module": model,
            "optimizer": torch.optim.SGD(model.parameters(), lr=lr),
            "data_loader": loader,
            "noise_multiplier": 1.0,
            "max_grad_norm": 1.0,
            "batch_first": True,
            "loss_reduction": "mean",
            "poisson_sampling": False,
            "noise_generator": torch.Generator().manual_seed(cell.seed),
        }
        if method == "opacus-hooks":
            gsm, dp_opt, _ = privacy.make_private(**common, grad_sample_mode="hooks")
            criterion = None
        else:
            gsm, dp_opt, criterion, _ = privacy.make_private(
                **common, criterion=SampledBCELoss(), grad_sample_mode="ghost"
            )

        def opacus_step(users: Tensor, items: Tensor) -> None:
            dp_opt.zero_grad(set_to_none=True)
            logits = gsm(users, items)
            loss = per_sample_bce(logits).mean() if criterion is None else criterion(logits, labels)
            loss.backward()
            dp_opt.step()

        return opacus_step
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


def run_cell(cell: Cell) -> dict[str, Any]:
    """Measure one cell in this process; returns ``{"status", "ms", "extra_mib", "steps", "note"}``."""
    warnings.filterwarnings("ignore", category=UserWarning)  # Opacus' secure-RNG and hook notices
    torch.set_num_threads(cell.threads)
    torch.manual_seed(cell.seed)
    if cell.method not in NOT_PRIVATE:  # import before the memory baseline (scipy etc. are ~100 MiB)
        import opacus  # noqa: F401

        import common.privacy.dpsgd  # noqa: F401
    _prime_torch()
    model = build_model(cell.model, cell.users, cell.items, cell.dim, NEUMF_MLP)
    g = torch.Generator().manual_seed(cell.seed + 1)
    batches = [
        (
            torch.randint(0, cell.users, (cell.batch,), generator=g),
            torch.randint(0, cell.items, (cell.batch, 1 + NEGATIVES), generator=g),
        )
        for _ in range(4)
    ]
    labels = torch.zeros(cell.batch, 1 + NEGATIVES)
    labels[:, 0] = 1.0
    base = _max_rss_bytes()
    result: dict[str, Any] = {"status": "ok", "ms": None, "extra_mib": None, "steps": 0, "note": ""}
    try:
        step = _make_step(cell, model, labels)
        times: list[float] = []
        warmup = cell.warmup
        for i in range(warmup):
            start = time.process_time()
            step(*batches[i % len(batches)])
            took = time.process_time() - start
            if i == 0 and cell.method in SLOW_SKIPPABLE and took > cell.max_step_s:
                raise Skip(f"skipped (≈{took:.1f} s/step > {cell.max_step_s:g} s)")
            if i == 0 and took > 1.0:
                break  # slow method: one warm-up step is enough
        measured_start = time.process_time()
        for i in range(cell.steps):
            start = time.process_time()
            step(*batches[i % len(batches)])
            times.append(time.process_time() - start)
            if len(times) >= 3 and time.process_time() - measured_start > cell.budget_s:
                break
        result.update(ms=1000 * statistics.median(times), min_ms=1000 * min(times), steps=len(times))
    except Skip as skip:
        result.update(status="skipped", note=str(skip))
    except Exception as error:  # a failing configuration is reported, not fatal
        result.update(status="error", note=_short_error(error))
    result["extra_mib"] = (_max_rss_bytes() - base) / MIB
    return result


def run_interleaved(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """Measure cells of one (model, catalogue) in this process, one step of each in turn.

    Every method sees the same load at the same time, so their ratios are measured
    in one process; CPU time per step as in :func:`run_cell`. Memory is not measured
    (``extra_mib`` is None). A cell whose set-up fails or is skipped is reported as such.
    """
    warnings.filterwarnings("ignore", category=UserWarning)
    first = cells[0]
    torch.set_num_threads(first.threads)
    g = torch.Generator().manual_seed(first.seed + 1)
    batches = [
        (
            torch.randint(0, first.users, (first.batch,), generator=g),
            torch.randint(0, first.items, (first.batch, 1 + NEGATIVES), generator=g),
        )
        for _ in range(4)
    ]
    labels = torch.zeros(first.batch, 1 + NEGATIVES)
    labels[:, 0] = 1.0
    results: list[dict[str, Any]] = []
    steps: dict[int, Callable[[Tensor, Tensor], None]] = {}
    for k, cell in enumerate(cells):
        results.append({"status": "ok", "ms": None, "extra_mib": None, "steps": 0, "note": ""})
        torch.manual_seed(cell.seed)
        try:
            steps[k] = _make_step(cell, build_model(cell.model, cell.users, cell.items, cell.dim, NEUMF_MLP), labels)
        except Skip as skip:
            results[k].update(status="skipped", note=str(skip))
        except Exception as error:
            results[k].update(status="error", note=_short_error(error))
    times: dict[int, list[float]] = {k: [] for k in steps}
    for i in range(first.warmup + first.steps):
        for k, step in list(steps.items()):
            start = time.process_time()
            try:
                step(*batches[i % len(batches)])
            except Exception as error:
                results[k].update(status="error", note=_short_error(error))
                del steps[k]
                continue
            if i >= first.warmup:
                times[k].append(time.process_time() - start)
    for k, measured in times.items():
        if k in steps and measured:
            results[k].update(ms=1000 * statistics.median(measured), min_ms=1000 * min(measured), steps=len(measured))
    return results


def _short_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text if len(text) <= 90 else text[:87] + "..."


def run_cell_isolated(cell: Cell, timeout_s: float = 300.0) -> dict[str, Any]:
    """Run one cell in a fresh interpreter (memory high-water mark, crash/OOM isolation)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "benchmarks.dp_step", "--cell", json.dumps(asdict(cell))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "error", "ms": None, "extra_mib": None, "steps": 0, "note": f"timed out after {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    last = (proc.stderr.strip().splitlines() or [""])[-1][:80]
    return {"status": "error", "ms": None, "extra_mib": None, "steps": 0, "note": f"crashed ({why}) {last}".strip()}


# --------------------------------------------------------------------------- table
@dataclass
class Row:
    """One printed row: a cell and its result."""

    cell: Cell
    result: dict[str, Any]

    @property
    def ms(self) -> float | None:
        return self.result["ms"] if self.result["status"] == "ok" else None


def best_non_private(rows: Sequence[Row], model: str, items: int) -> Row | None:
    """The fastest non-private row for a (model, catalogue), if any was measured."""
    candidates = [
        r for r in rows if r.cell.model == model and r.cell.items == items and r.cell.method in NON_PRIVATE and r.ms
    ]
    return min(candidates, key=lambda r: r.ms) if candidates else None


def table_rows(rows: Sequence[Row]) -> list[list[str]]:
    """Formatted cells: model, items, method, ms/step, × best non-private, extra MiB, steps."""
    out = []
    for r in rows:
        best = best_non_private(rows, r.cell.model, r.cell.items)
        if r.ms is not None:
            ms, fastest = (f"{x:.1f}" if x < 100 else f"{x:.0f}" for x in (r.ms, r.result["min_ms"]))
            ratio = f"{r.ms / best.ms:.2f}×" if best else "—"
            extra = "—" if r.result["extra_mib"] is None else f"{r.result['extra_mib']:.0f}"
        else:
            ms, fastest, ratio = r.result["note"] or r.result["status"], "—", "—"
            extra = "—"
        if best is r:
            ratio += " (best)"
        out.append([r.cell.model, f"{r.cell.items:,}", r.cell.method, ms, fastest, ratio, extra, str(r.result["steps"])])
    return out


HEADERS = ["model", "items", "method", "ms/step (median)", "min ms", "× best non-private", "peak extra MiB", "steps"]


def mf_or_neumf_target(model: str, items: int) -> float:
    """fedrec's allowed multiple of the best non-private step."""
    if model == "mf":
        return 1.3 if items <= SMALL_CATALOGUE else 1.5
    return 2.0


def targets(rows: Sequence[Row]) -> list[str]:
    """One line per (model, catalogue): speed and memory targets of fedrec, met or missed."""
    lines = []
    for r in rows:
        if r.cell.method != "fedrec":
            continue
        label = f"{r.cell.model.upper() if r.cell.model == 'mf' else 'NeuMF'} @ {r.cell.items:,} items"
        best = best_non_private(rows, r.cell.model, r.cell.items)
        goal = mf_or_neumf_target(r.cell.model, r.cell.items)
        if r.ms is None or best is None:
            lines.append(f"{label}: speed not measured ({r.result['note'] or 'no non-private baseline'})")
        else:
            ratio = r.ms / best.ms
            verdict = (
                "MET"
                if ratio <= goal
                else f"MISSED by {ratio - goal:.2f}× (needs ≤ {goal * best.ms:.1f} ms, {100 * (1 - goal * best.ms / r.ms):.0f}% faster)"
            )
            lines.append(
                f"{label}: fedrec {r.ms:.1f} ms = {ratio:.2f}× best non-private ({best.cell.method} {best.ms:.1f} ms), "
                f"target ≤ {goal:g}× → {verdict}"
            )
            closed = next(
                (c for c in rows if c.cell.method == CLOSED_FORM_BASELINE and c.cell.model == r.cell.model
                 and c.cell.items == r.cell.items and c.ms),
                None,
            )
            if closed is not None and closed.ms is not None:
                lines.append(
                    f"{label}: fedrec = {r.ms / closed.ms:.2f}× {CLOSED_FORM_BASELINE} ({closed.ms:.1f} ms: the sparse "
                    "non-private step with fedrec's closed-form score gradient; not the issue's baseline)"
                )
        extra = r.result["extra_mib"]
        if extra is None:
            continue
        budget = fedrec_memory_budget(r.cell) / MIB
        dense = r.cell.batch * r.cell.items * sum(table_widths(r.cell.model, r.cell.dim)[1].values()) * 4 / GIB
        verdict = "MET" if extra <= budget else f"MISSED by {extra - budget:.0f} MiB"
        lines.append(
            f"{label}: fedrec peak extra {extra:.0f} MiB, O(B·d) budget {budget:.0f} MiB "
            f"(B·V·Σd per-sample item gradients would be {dense:.1f} GiB) → {verdict}"
        )
    return lines


def print_markdown(rows: Sequence[Row], header: str) -> None:
    print(header + "\n")
    print("| " + " | ".join(HEADERS) + " |")
    print("|" + "---|" * len(HEADERS))
    for cells in table_rows(rows):
        print("| " + " | ".join(cells) + " |")
    print("\nTargets:\n")
    for line in targets(rows):
        print(f"- {line}")


def print_rich(rows: Sequence[Row], header: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(140, Console().width))
    table = Table(title=header)
    for name in HEADERS:
        table.add_column(name, justify="left" if name in ("model", "method") else "right")
    previous = None
    for row, cells in zip(rows, table_rows(rows), strict=True):
        key = (row.cell.model, row.cell.items)
        if previous is not None and key != previous:
            table.add_section()
        previous = key
        table.add_row(*cells)
    console.print(table)
    console.print("[bold]Targets[/bold]")
    for line in targets(rows):
        console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)


# --------------------------------------------------------------------------- main
def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(x.replace("_", "")) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=_csv(str), default=["mf", "neumf"])
    parser.add_argument("--items", type=_csv(int), default=[3706, 100_000, 1_000_000])
    parser.add_argument("--methods", type=_csv(str), default=list(METHODS))
    parser.add_argument("--users", type=int, default=None, help="default: 6,040 for ≤10k items, else 10,000")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="most measured steps per cell")
    parser.add_argument("--budget-s", type=float, default=5.0, help="stop measuring a cell after this (≥3 steps)")
    parser.add_argument("--max-step-s", type=float, default=2.0, help="skip ghost / dense-noise cells slower than this")
    parser.add_argument("--hooks-max-gib", type=float, default=6.0, help="skip opacus-hooks above this estimate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (README)")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per cell (tests; memory less exact)")
    parser.add_argument(
        "--interleave", action="store_true",
        help="one process; the methods of a (model, catalogue) take steps in turn (ratios under the same load; no memory)",
    )
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; use {', '.join(METHODS)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Measure every (model, catalogue, method) cell, print the table and the targets."""
    args = parse_args(argv)
    if args.cell:  # hidden: one cell in this (fresh) process, JSON result on stdout
        print(json.dumps(run_cell(Cell(**json.loads(args.cell)))))
        return []
    cells = [
        Cell(
            method=method,
            model=model,
            items=items,
            users=args.users or users_for(items),
            dim=args.dim,
            batch=args.batch,
            steps=args.steps,
            threads=args.threads,
            budget_s=args.budget_s,
            max_step_s=args.max_step_s,
            hooks_max_gib=args.hooks_max_gib,
        )
        for model in args.models
        for items in args.items
        for method in args.methods
    ]
    rows = []
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    if args.interleave:
        groups: dict[tuple[str, int], list[Cell]] = {}
        for cell in cells:
            groups.setdefault((cell.model, cell.items), []).append(cell)
        for group in groups.values():
            rows += [Row(c, r) for c, r in zip(group, run_interleaved(group), strict=True)]
            print(f"[{time.perf_counter() - started:5.0f}s] {group[0].model} {group[0].items:,} done", file=sys.stderr)
        cells = []
    for i, cell in enumerate(cells, 1):
        result = run_cell(cell) if args.in_process else run_cell_isolated(cell)
        rows.append(Row(cell, result))
        shown = f"{result['ms']:.1f} ms" if result["status"] == "ok" else result["note"]
        print(
            f"[{i}/{len(cells)} {time.perf_counter() - started:5.0f}s] {cell.model} {cell.items:,} {cell.method}: {shown}",
            file=sys.stderr,
            flush=True,
        )
    header = (
        f"One DP-SGD step, B={args.batch}, d={args.dim}, 1+{NEGATIVES} items/sample, "
        f"{args.threads} thread(s), σ=1, C=1; 1-min load average {load_before:.1f} → {os.getloadavg()[0]:.1f}"
    )
    (print_markdown if args.markdown else print_rich)(rows, header)
    return rows


if __name__ == "__main__":
    main()
