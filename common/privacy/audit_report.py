"""The audit's outputs: ``audit.json``, ``audit.md`` (a privacy statement) and plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.privacy.audit import AuditResult
from common.privacy.replay import LedgerAudit, dropout_text
from common.privacy.statement import ranges, run_releases, statements
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
    """``audit.md``: one sentence per owner, verdict, threat model, the numbers per ledger group."""
    cfg = result.config
    mode = str(cfg.get("privacy.mode", "none"))
    found, unreadable = run_releases(RunDir(Path(result.run_dir)))
    lines = [f"# Privacy audit of `{result.run_dir}`", "", "## Privacy statement", ""]
    lines += [f"- {s}" for s in statements(found, mode, problems=unreadable)]
    lines.append("")
    if result.problems:
        lines += [
            f"**Verdict: FAILED** (exit code {result.exit_code}): the sentences above restate what the "
            "ledgers claim, and these problems mean the claims do not all hold. Problems:",
            "",
        ]
        lines += [f"- {p}" for p in result.problems]
    else:
        lines += [
            "**Verdict: passed.** Every ledger chain verifies and is anchored; every ε the run "
            "claimed equals the ε replayed from the ledger; no budget was exceeded"
            + ("; the empirical audit found no leak beyond the claim." if result.empirical else ".")
        ]
    if result.warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in result.warnings]
    lines += ["", "## Threat model and what is released", ""]
    lines.append(f"- Privacy mode: `{mode}`.")
    if "local" in mode:
        lines.append(
            "- Local DP (`dp-sgd` events): each silo trains with DP-SGD before anything leaves it, so the "
            "guarantee holds against the server, the other silos and anyone who sees the released "
            "models; the silo itself is trusted with its own users' data."
        )
    if "central" in mode:
        lines.append(
            "- Central DP (`dp-fedavg` events): the server is trusted to clip, sample and add noise; the "
            "guarantee holds for whoever sees the released shared models and the run directory."
        )
    lines += [
        "- Neighbouring relation: zero-out (one unit's data replaced by none); each owner's roster "
        "size N is public and the same for both neighbours.",
        "- Released under DP: the shared model parameters after every round (item embeddings and "
        "biases, the score function) and, where a silo's ledger has `dp-evaluation` events, its noisy "
        "evaluation sums, each accounted in that ledger. Users' own rows never leave their silo; "
        "under user-level DP they are a function of the user's data and released parameters only "
        "(joint DP). Training losses, timings and exact evaluation sums stay in the silos; under "
        "central DP the server keeps no per-silo statistics or counts.",
        f"- Noise: {_generator(cfg.get('privacy.noise-generator'))}; attacks on the floating-point "
        "representation of the noise are not mitigated.",
        "- **Not covered** by any ε: hyperparameter tuning on the silos' validation data, the timing "
        "and size of messages, the public rosters (N per silo, the silos themselves) and the item "
        "catalogue (`docs/privacy.md`).",
        "",
        "## Unit of privacy and mechanism, per ledger",
        "",
    ]
    lines += _summary_table(result.ledgers)
    for group, body in _groups(result.ledgers):
        lines += _group_header(group) + body
    lines += _empirical_section(result.empirical, cfg)
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


def _generator(name: object) -> str:
    if name == "csprng":
        return "local DP-SGD's Gaussian noise comes from `os.urandom` (`privacy.noise-generator = csprng`)"
    if name == "os-seeded":
        return (
            "local DP-SGD's Gaussian noise comes from torch's generator seeded from OS entropy every round "
            "(`privacy.noise-generator = os-seeded`), not a cryptographic generator"
        )
    return "the noise generator is not recorded in config.json"


def _groups(ledgers: list[LedgerAudit]) -> list[tuple[list[LedgerAudit], list[str]]]:
    """Ledgers whose sections read the same (all but the owner) share one section, in order."""
    groups: dict[tuple[str, ...], list[LedgerAudit]] = {}
    for led in ledgers:
        groups.setdefault(tuple(_ledger_body(led)), []).append(led)
    return [(group, list(body)) for body, group in groups.items()]


def _group_header(group: list[LedgerAudit]) -> list[str]:
    names = ", ".join(f"`{led.owner}`" for led in group)
    if len(group) == 1:
        return [f"### {names} ({group[0].lines} ledger lines)", ""]
    return [f"### {names}: {len(group)} identical ledgers ({group[0].lines} lines each)", ""]


def _summary_table(ledgers: list[LedgerAudit]) -> list[str]:
    """One row per group of ledgers with the same unit, N, δ, mechanism, steps and ε."""
    rows: dict[tuple[Any, ...], list[str]] = {}
    for led in ledgers:
        if not led.trajectory:
            continue
        mech = led.mechanisms[0] if len(led.mechanisms) == 1 else None
        key = (
            led.unit,
            led.population,
            f"{led.delta:.3g}",
            "several" if mech is None else f"{mech['noise-multiplier']:.4g}",
            "several" if mech is None else f"{mech['sample-rate']:.4g}",
            "several" if mech is None else f"{mech['clip']:g}",
            led.total_steps,
            _f(led.final_pld),
            _f(led.final_rdp),
            _f(led.final_prv),
            f"{led.target_epsilon:g}" if led.target_epsilon else "-",
        )
        rows.setdefault(key, []).append(f"`{led.owner}`")
    if not rows:
        return []
    out = [
        "| ledgers | unit | N | δ | σ | q | C | steps | ε (PLD) | RDP | PRV | budget |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    out += [f"| {', '.join(owners)} | " + " | ".join(str(x) for x in key) + " |" for key, owners in rows.items()]
    return [*out, ""]


def _ledger_body(led: LedgerAudit) -> list[str]:
    out: list[str] = []
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
            f"{m['clip']:g}; {m['steps']} steps over rounds {ranges(m['rounds'])}."
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
    for d in led.dropouts:
        out.append(f"\n{dropout_text(d, capital=True)}.")
    return [*out, ""]


def _empirical_section(emp: dict[str, Any] | None, cfg: Mapping[str, Any]) -> list[str]:
    out = ["## Empirical audit", ""]
    if not emp:
        return out + _no_empirical(cfg)
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


def _no_empirical(cfg: Mapping[str, Any]) -> list[str]:
    """Why no empirical audit ran, and how to run one."""
    trained = int(cfg.get("audit.canaries", 0) or 0), int(cfg.get("audit.central-canaries", 0) or 0)
    if any(trained):
        return [
            "**Not run**, although this run trained canaries (`audit.canaries` = "
            f"{trained[0]}, `audit.central-canaries` = {trained[1]}): the audit was started with "
            "`--no-empirical`, or the canaries could not be scored (see the problems and warnings "
            "above). Run `fedrec audit RUN_DIR` (empirical is the default) to score them.",
            "",
        ]
    mode = str(cfg.get("privacy.mode", "none"))
    how = []
    if "local" in mode or mode == "none":
        how.append(
            "local DP: re-run with `-c audit.canaries=1000` (canary users in silo `audit.canary-silo`, "
            "a one-run lower bound on ε)"
        )
    if "central" in mode or mode == "none":
        how.append(
            "central DP: re-run with `-c audit.central-canaries=20` (canary clients, a one-shot "
            "estimate of the client-level ε)"
        )
    return [
        "**Not run:** this run trained no canaries, so only the accounting above was checked, not "
        "what the released models leak. To audit empirically, " + "; ".join(how) + ", then run "
        "`fedrec audit RUN_DIR` (`docs/audit.md`).",
        "",
    ]


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
