"""``fedrec centralized``: the same model on the pooled data, the reference for every run."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.config import resolve_config
from cli.options import ConfigOpt, DataDirOpt, DatasetOpt, RunDirOpt
from cli.output import console, fail, fmt
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
        _, cfg = resolve_config(config, **named)
    except FedrecError as e:
        fail(e)
    from common.storage import atomic_write_bytes
    from simulations.centralized import EpochResult, best_epoch, run_centralized

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
        lines: list[str] = []

        def on_epoch(r: EpochResult) -> None:
            m = r.metrics
            lines.append(json.dumps({"epoch": r.epoch, "loss": r.loss, "seconds": r.seconds, **m}) + "\n")
            # The whole file each epoch, atomically: a crash or a full disk never leaves a
            # truncated line (epochs are few and lines short).
            atomic_write_bytes(run.metrics, "".join(lines).encode(), mode=0o644)
            console.print(
                f"epoch {r.epoch}: loss {fmt(r.loss)} | val-hr@{k} {fmt(m[f'val-hr@{k}'])} | "
                f"test-hr@{k} {fmt(m[f'test-hr@{k}'])} | test-ndcg@{k} {fmt(m[f'test-ndcg@{k}'])} | "
                f"test-full-recall@20 {fmt(m.get('test-full-recall@20'))}"
            )

        try:
            results = run_centralized(cfg, n_epochs, model_name=name, on_epoch=on_epoch)
        except FedrecError as e:
            fail(e)
        best = best_epoch(results, k) if name != "popularity" else results[-1]
        summary = {"model": name, "best-epoch": best.epoch, **best.metrics}
        atomic_write_bytes(run.summary, (json.dumps(summary, indent=2) + "\n").encode(), mode=0o644)
    console.print(
        f"best validation epoch {best.epoch}: test HR@{k} {fmt(best.metrics[f'test-hr@{k}'])}, "
        f"NDCG@{k} {fmt(best.metrics[f'test-ndcg@{k}'])}, "
        f"Recall@20 {fmt(best.metrics.get('test-full-recall@20'))}"
    )
    console.print(f"results: {run.path}")
