"""The empirical part of ``fedrec audit``: score the run's canaries and bound or estimate ε."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from common.config import AppConfig
from common.errors import FedrecError
from common.privacy.events import silo_owner
from common.privacy.replay import LedgerAudit, Problem
from common.rundir import RunDir


def empirical_audit(
    run_dir: RunDir,
    run_config: dict[str, Any],
    ledgers: list[LedgerAudit],
    problems: list[Problem],
    warnings: list[str],
) -> dict[str, Any] | None:
    try:
        cfg = AppConfig.from_run_config(run_config)
    except FedrecError as exc:
        warnings.append(f"config.json does not parse with this fedrec version ({exc}); empirical audit skipped")
        return None
    if not (cfg.audit.canaries or cfg.audit.central_canaries):
        return None
    from common.privacy import canaries, one_run, one_shot
    from common.storage import load_arrays

    initial_path, final_path = run_dir.initial_model, run_dir.final_model
    for path in (initial_path, final_path):
        if not path.exists():
            problems.append(
                Problem("empirical", "server", None, None, f"{path.name} missing: canaries cannot be scored")
            )
            return None
    initial = {k: v.numpy() for k, v in load_arrays(initial_path).items()}
    final = {k: v.numpy() for k, v in load_arrays(final_path).items()}
    out: dict[str, Any] = {}
    if cfg.audit.canaries:
        owner = silo_owner(cfg.audit.canary_silo)
        audited = next((led for led in ledgers if led.owner == owner), None)
        from common.models import build_model

        model = build_model(cfg.model.name, 1, 2, cfg.model.dim, cfg.model.mlp_layers)
        item_tables = tuple(model.item_tables)
        num_items = final[f"{item_tables[0]}.weight"].shape[0]
        plan = canaries.canary_plan(cfg.audit, num_items - cfg.audit.canaries)
        scores = canaries.canary_scores(initial, final, item_tables, plan)
        delta = float(audited.delta) if audited and audited.delta is not None else 1e-5
        if 2 * plan.count * delta > 0.05:
            warnings.append(
                f"{owner}: δ={delta:.3g} is too large for a one-run audit with {plan.count} canaries "
                f"(2·m·δ = {2 * plan.count * delta:.3g} > 0.05): the lower bound stays near 0 whatever "
                "the model leaks; claim ε at δ ≤ 0.025/m (privacy.local.delta) to audit it"
            )
        result = one_run.one_run_audit(scores, plan.included, delta)
        claimed = audited.final_pld if audited else math.nan
        out["one-run"] = {
            "silo": cfg.audit.canary_silo,
            "unit": "user (each canary is one user with one interaction)",
            "canaries": plan.count,
            "included": int(plan.included.sum()),
            "claimed-epsilon": claimed,
            "delta": delta,
            "unsafe-disable-noise": cfg.audit.unsafe_disable_noise,
            **result.to_dict(),
        }
        if result.epsilon_lb > claimed:
            problems.append(
                Problem(
                    "empirical",
                    owner,
                    None,
                    None,
                    f"one-run audit lower bound ε_LB={result.epsilon_lb:.3f} (95% confidence) exceeds the claimed "
                    f"ε={claimed:.3f}: the model leaks more than the ledger says (is the noise really added?)",
                )
            )
    data = run_dir.read_central_canaries() if cfg.audit.central_canaries else None
    if data is not None:
        server = next((led for led in ledgers if led.owner == "server"), None)
        delta = float(server.delta) if server and server.delta is not None else 1e-5
        est = one_shot.one_shot_epsilon(np.array(data["cosines"]), int(data["dim"]), delta)
        claimed = server.final_pld if server else math.nan
        out["one-shot"] = {"claimed-epsilon": claimed, **est.to_dict()}
        if est.epsilon > claimed:
            warnings.append(
                f"server: the one-shot estimate ε̂={est.epsilon:.3f} from {est.count} canary clients exceeds "
                f"the claimed client-level ε={claimed:.3f} (an estimate, not a bound: investigate)"
            )
    if cfg.audit.unsafe_disable_noise:
        warnings.append(
            "config sets audit.unsafe-disable-noise: this run trained WITHOUT noise while claiming σ "
            "(a deliberate audit demonstration)"
        )
    return out or None
