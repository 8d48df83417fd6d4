"""The audit's outputs: ``audit.json``, ``audit.md`` (a privacy statement) and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common.privacy.audit import AuditResult
from common.privacy.replay import LedgerAudit
from common.rundir import RunDir

_LAYOUT = RunDir(Path("."))  # the audit's file names; written to any folder
AUDIT_JSON = _LAYOUT.audit_json.name
AUDIT_MD = _LAYOUT.audit_report.name
PLOT_ROUNDS = _LAYOUT.audit_rounds_plot.name
PLOT_DELTA = _LAYOUT.audit_delta_plot.name


def write_audit(result: AuditResult, out_dir: Path) -> list[Path]:
    """Write the JSON, the statement and the plots; returns their paths."""
    from common.storage import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / AUDIT_JSON, out_dir / AUDIT_MD]
    atomic_write_bytes(paths[0], (json.dumps(_finite(result.to_dict()), indent=2) + "\n").encode())
    atomic_write_bytes(paths[1], render_statement(result).encode())
    if any(led.trajectory for led in result.ledgers):
        paths += plot_audit(result, out_dir)
    return paths


def _finite(obj: Any) -> Any:
    """JSON has no ∞: write it as the string "inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _f(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    return "∞" if math.isinf(x) else f"{x:.{digits}f}"


def render_statement(result: AuditResult) -> str:
    """``audit.md``: verdict, threat model, what is covered, the numbers."""
    cfg = result.config
    mode = str(cfg.get("privacy.mode", "none"))
    lines = [f"# Privacy audit of `{result.run_dir}`", ""]
    if result.problems:
        lines += [f"**Verdict: FAILED** (exit code {result.exit_code}). Problems:", ""]
        lines += [f"- {p}" for p in result.problems]
    else:
        lines += ["**Verdict: passed.** Every ledger chain verifies and is anchored; every ε the run "
                  "claimed equals the ε replayed from the ledger; no budget was exceeded"
                  + ("; the empirical audit found no leak beyond the claim." if result.empirical else ".")]
    if result.warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in result.warnings]
    lines += ["", "## Threat model and what is released", ""]
    lines += [
        f"- Privacy mode: `{mode}`.",
        "- Local DP (`dp-sgd` events): each silo trains with DP-SGD before anything leaves it, so the "
        "guarantee holds against the server, the other silos and anyone who sees the released "
        "models; the silo itself is trusted with its own users' data.",
        "- Central DP (`dp-fedavg` events): the server is trusted to clip, sample and add noise; the "
        "guarantee holds for whoever sees the released shared models.",
        "- Released: the shared model parameters after every round (item embeddings and biases, the "
        "score function). Users' own rows never leave their silo; under user-level DP they are a "
        "function of the user's data and released parameters only (joint DP).",
        "- **Not covered:** training losses and evaluation metrics the silos report (not noised), "
        "hyperparameter tuning on validation data, population sizes (public FedAvg weights and "
        "sampling rates), the timing and size of messages. Noise is drawn from torch's Mersenne "
        "Twister seeded with OS entropy, not a cryptographic generator.",
        "",
        "## Unit of privacy and mechanism, per ledger",
        "",
    ]
    for led in result.ledgers:
        lines += _ledger_section(led)
    lines += _empirical_section(result.empirical)
    lines += [
        "## How these numbers were obtained",
        "",
        "Each ledger line is one mechanism use (or budget decision); `fedrec audit` verified the "
        "SHA-256 chain of every ledger, the per-round anchors of the silo ledgers in the server "
        "ledger and the server ledger's head in `state.json`, then replayed the events with "
        "dp-accounting's PLD accountant (ε of record), its RDP accountant and Opacus' PRV "
        "accountant. The ledger format and a ten-line replay with dp-accounting alone are in "
        "`docs/ledger-format.md`.",
        "",
    ]
    if any(led.trajectory for led in result.ledgers):
        lines += [f"![ε per round]({PLOT_ROUNDS})", "", f"![ε(δ)]({PLOT_DELTA})", ""]
    return "\n".join(lines)


def _ledger_section(led: LedgerAudit) -> list[str]:
    out = [f"### `{led.owner}` ({led.lines} ledger lines)", ""]
    if not led.trajectory and not led.declines:
        return [*out, "No mechanism use recorded.", ""]
    out += [
        f"- Unit: **{led.unit}**; neighbouring data sets: {led.neighbouring}.",
        f"- δ = {led.delta:.3g} ({led.delta_rule}"
        + (f"; population N = {led.population}, 1/N = {1 / led.population:.3g}" if led.population else "")
        + ").",
        f"- Accountant of record: {led.accountant}; budget: "
        + (f"ε ≤ {led.target_epsilon:g}." if led.target_epsilon else "none."),
    ]
    for m in led.mechanisms:
        out.append(
            f"- Mechanism: {m['mechanism']} ({m['sampling']} sampling), noise multiplier σ = "
            f"{m['noise-multiplier']:.4g}, sampling rate q = {m['sample-rate']:.4g}, clip C = "
            f"{m['clip']:g}; {m['steps']} steps over rounds {_ranges(m['rounds'])}."
        )
    out += [
        "",
        f"**ε = {_f(led.final_pld)} at δ = {led.delta:.3g}** (PLD, {led.total_steps} steps) · RDP "
        f"{_f(led.final_rdp)} · Opacus PRV {_f(led.final_prv)} · without amplification by sampling "
        f"{_f(led.no_amplification)}.",
        "",
        "| round | line | claimed ε | replayed ε (PLD) | RDP | steps so far |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    out += [
        f"| {t.round} | {t.line} | {_f(t.claimed, 4)} | {_f(t.pld, 4)} | {_f(t.rdp, 4)} | {t.steps} |"
        for t in led.trajectory
    ]
    for d in led.declines:
        out.append(
            f"\nBudget: declined round {d['round']} (line {d['line']}): ε {_f(d['epsilon'])} would have "
            f"become {_f(d['epsilon-if-trained'])} > budget {d['target-epsilon']:g}."
        )
    return [*out, ""]


def _ranges(rounds: list[int]) -> str:
    if not rounds:
        return "-"
    parts, start, prev = [], rounds[0], rounds[0]
    for r in [*rounds[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}" if start == prev else f"{start}–{prev}")
        if r is not None:
            start = prev = r
    return ", ".join(parts)


def _empirical_section(emp: dict[str, Any] | None) -> list[str]:
    if not emp:
        return []
    out = ["## Empirical audit", ""]
    one = emp.get("one-run")
    if one:
        out += [
            f"One-run audit (Steinke, Nasr and Jagielski, 2023) of silo {one['silo']}: "
            f"{one['canaries']} canary users ({one['included']} included, each with probability ½), "
            "each with one interaction on its own canary item (never a training negative). Score: "
            "how far the canary item's shared rows moved from their initial values. Guesses: the "
            "top k+ scores \"in\", the bottom k− \"out\", for a grid of k fixed in advance, "
            f"Bonferroni-corrected; δ = {one['delta']:.3g}.",
            "",
            f"**ε_LB = {_f(one['epsilon_lb'])} (95% confidence) vs claimed ε = {_f(one['claimed-epsilon'])}** "
            f"(best guesses: {one['k_plus']} in / {one['k_minus']} out, {one['v']} of {one['r']} correct).",
            "",
        ]
        if one.get("unsafe-disable-noise"):
            out += ["This run set `audit.unsafe-disable-noise`: it trained without noise on purpose.", ""]
    shot = emp.get("one-shot")
    if shot:
        out += [
            f"One-shot estimate (Andrew et al., 2024) from {shot.get('count')} canary clients: "
            f"**ε̂ = {_f(shot.get('epsilon'))}** vs claimed client-level ε = {_f(shot.get('claimed-epsilon'))}. "
            "An estimate, not a bound.",
            "",
        ]
    return out


def plot_audit(result: AuditResult, out_dir: Path) -> list[Path]:
    """ε per round per ledger (claimed vs replayed), and the final ε(δ) curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for led in result.ledgers:
        if led.trajectory:
            xs = [t.round for t in led.trajectory]
            line = ax.plot(xs, [t.pld for t in led.trajectory], "-o", ms=3, label=f"{led.owner} (PLD)")[0]
            ax.plot(xs, [t.rdp for t in led.trajectory], ":", color=line.get_color())
            if led.target_epsilon:
                ax.axhline(led.target_epsilon, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("round")
    ax.set_ylabel("ε (replayed; dotted: RDP)")
    ax.set_title("ε per round per ledger")
    ax.legend(fontsize=7)
    fig.tight_layout()
    rounds_path = out_dir / PLOT_ROUNDS
    fig.savefig(rounds_path, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for led in result.ledgers:
        curve = [(d, e) for d, e in led.epsilon_delta_curve if math.isfinite(e)]
        if curve:
            ax.plot([d for d, _ in curve], [e for _, e in curve], label=led.owner)
            if led.delta:
                ax.axvline(led.delta, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("δ")
    ax.set_ylabel("ε (PLD)")
    ax.set_title("final ε as a function of δ (dotted: δ of record)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    delta_path = out_dir / PLOT_DELTA
    fig.savefig(delta_path, dpi=120)
    plt.close(fig)
    return [rounds_path, delta_path]
