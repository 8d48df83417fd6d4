"""``fedrec centralized``: the same model on the pooled data, the reference for every run."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.config import resolve_config
from cli.options import ConfigOpt, DataDirOpt, DatasetOpt, RunDirOpt
from cli.output import console, fail, fmt, os_errors
from cli.runs import choose_run_dir, refuse_existing_run, run_dir_session
from common.errors import ConfigError, FedrecError
from common.run_config import Scalar


def centralized(
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    model: Annotated[str | None, typer.Option(help="mf | neumf | popularity.")] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Training epochs (default: num-server-rounds x local-epochs).")
    ] = None,
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Train the same model on the pooled data, same split and metrics (the reference)."""
    try:
        named: dict[str, Scalar | None] = {
            "data.dataset": dataset,
            "data.path": str(data_dir) if data_dir else None,
            "model.name": None if model == "popularity" else model,
        }
        run_config, cfg = resolve_config(config, **named)
    except FedrecError as e:
        fail(e)
    from simulations.centralized import EpochResult
    from simulations.centralized_run import run_centralized_dir

    n_epochs = epochs if epochs is not None else cfg.num_server_rounds * cfg.train.local_epochs
    run = choose_run_dir(run_dir, f"centralized-{cfg.data.dataset}")
    k = cfg.eval.k
    name = model or cfg.model.name
    with run_dir_session(run):
        try:
            refuse_existing_run(run, "choose another --run-dir")
        except ConfigError as e:
            fail(e)
        console.print(f"[bold]fedrec centralized[/]: {cfg.data.dataset}, model {name}, {n_epochs} epochs")

        def on_epoch(r: EpochResult) -> None:
            m = r.metrics
            if not m:
                console.print(f"epoch {r.epoch}: loss {fmt(r.loss)} (not evaluated: eval.every {cfg.eval.every})")
                return
            console.print(
                f"epoch {r.epoch}: loss {fmt(r.loss)} | val-hr@{k} {fmt(m[f'val-hr@{k}'])} | "
                f"test-hr@{k} {fmt(m[f'test-hr@{k}'])} | test-ndcg@{k} {fmt(m[f'test-ndcg@{k}'])} | "
                f"test-full-recall@20 {fmt(m.get('test-full-recall@20'))}"
            )

        try:
            with os_errors(run.path):
                summary = run_centralized_dir(run, run_config, cfg, n_epochs, model_name=name, on_epoch=on_epoch)
        except FedrecError as e:
            fail(e)
    console.print(
        f"best validation epoch {summary['best-epoch']}: test HR@{k} {fmt(summary[f'test-hr@{k}'])}, "
        f"NDCG@{k} {fmt(summary[f'test-ndcg@{k}'])}, "
        f"Recall@20 {fmt(summary.get('test-full-recall@20'))}"
    )
    console.print(f"results: {run.path}")
