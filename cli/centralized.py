"""``fedrec centralized``: the same model on the pooled data, the reference for every run."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.config import resolve_config
from cli.options import ConfigOpt, DataDirOpt, DatasetOpt, RunDirOpt
from cli.output import console, fail, fmt
from cli.runs import choose_run_dir
from common.errors import FedrecError
from common.run_config import Scalar


def centralized(
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    model: Annotated[str | None, typer.Option(help="mf | neumf | popularity.")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Training epochs (default: num-server-rounds x local-epochs).")
    ] = None,
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Train the same model on the pooled data, same split and metrics (the reference)."""
    from simulations.centralized import EpochResult, best_epoch, run_centralized

    try:
        named: dict[str, Scalar | None] = {
            "data.dataset": dataset,
            "data.path": str(data_dir) if data_dir else None,
            "model.name": None if model == "popularity" else model,
        }
        _, cfg = resolve_config(config, **named)
    except FedrecError as e:
        fail(e)
    n_epochs = epochs or cfg.num_server_rounds * cfg.train.local_epochs
    run = choose_run_dir(run_dir, f"centralized-{cfg.data.dataset}")
    run.path.mkdir(parents=True, exist_ok=True)
    k = cfg.eval.k
    name = model or cfg.model.name
    console.print(f"[bold]fedrec centralized[/]: {cfg.data.dataset}, model {name}, {n_epochs} epochs")
    lines = run.metrics.open("w")

    def on_epoch(r: EpochResult) -> None:
        m = r.metrics
        lines.write(json.dumps({"epoch": r.epoch, "loss": r.loss, "seconds": r.seconds, **m}) + "\n")
        lines.flush()
        console.print(
            f"epoch {r.epoch}: loss {fmt(r.loss)} | val-hr@{k} {fmt(m[f'val-hr@{k}'])} | "
            f"test-hr@{k} {fmt(m[f'test-hr@{k}'])} | test-ndcg@{k} {fmt(m[f'test-ndcg@{k}'])} | "
            f"test-full-recall@20 {fmt(m.get('test-full-recall@20'))}"
        )

    try:
        results = run_centralized(cfg, n_epochs, model_name=name, on_epoch=on_epoch)
    except FedrecError as e:
        fail(e)
    finally:
        lines.close()
    best = best_epoch(results, k) if name != "popularity" else results[-1]
    summary = {"model": name, "best-epoch": best.epoch, **best.metrics}
    run.summary.write_text(json.dumps(summary, indent=2) + "\n")
    console.print(
        f"best validation epoch {best.epoch}: test HR@{k} {fmt(best.metrics[f'test-hr@{k}'])}, "
        f"NDCG@{k} {fmt(best.metrics[f'test-ndcg@{k}'])}, "
        f"Recall@20 {fmt(best.metrics.get('test-full-recall@20'))}"
    )
    console.print(f"results: {run.path}")
