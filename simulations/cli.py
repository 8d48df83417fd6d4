"""The ``fedrec`` command: simulate, centralized baseline.

Every command validates its settings and data *before* starting anything, so bad
input fails fast with a message naming the key, file or line.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from common.config import (
    AppConfig,
    Scalar,
    flatten,
    load_default_run_config,
    merge_overrides,
    parse_override,
)
from common.data.pipeline import load_interactions, split_interactions
from common.data.partition import partition_users
from common.errors import ConfigError, FedrecError
from common.rundir import default_run_dir
from common.seeding import derive_seed
from simulations.audit_cli import audit
from simulations.data_cli import data_app
from simulations.deploy import deploy_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--config", "-c", help="Override: -c train.lr=0.005, or a TOML file of overrides (repeatable)."
    ),
]
DatasetOpt = Annotated[
    str | None, typer.Option(help="synthetic | ml-100k | ml-1m | csv | parquet (data.dataset).")
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="MovieLens directory or CSV/Parquet file (data.path).")
]
ModelOpt = Annotated[str | None, typer.Option(help="mf | neumf (model.name).")]
RunDirOpt = Annotated[Path | None, typer.Option(help="Where to write the run (default runs/<time>-<dataset>).")]

_PROGRESS = re.compile(r"fedrec |│|ERROR|Error|Exception|Traceback|Successfully started run")


def resolve_config(
    overrides: list[str] | None, **named: Scalar | None
) -> tuple[dict[str, Scalar], AppConfig]:
    """Defaults + named options + ``-c`` overrides, parsed and validated."""
    values: dict[str, Scalar] = {k: v for k, v in named.items() if v is not None}
    for text in overrides or []:
        if text.endswith(".toml") and "=" not in text:
            values.update(load_override_file(Path(text)))
        else:
            key, value = parse_override(text)
            values[key] = value
    if isinstance(values.get("data.path"), str) and values["data.path"]:
        values["data.path"] = str(Path(str(values["data.path"])).expanduser().resolve())
    run_config = merge_overrides(load_default_run_config(), values)
    return run_config, AppConfig.from_run_config(run_config)


def load_override_file(path: Path) -> dict[str, Scalar]:
    """Overrides from a TOML file (nested tables or dotted keys), as ``flwr run -c`` takes."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return flatten(table)


def _run_dir(run_dir: Path | None, label: str) -> Path:
    return run_dir.resolve() if run_dir is not None else default_run_dir(label).resolve()


def _fail(error: Exception) -> None:
    err.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(2)


@app.command()
def simulate(
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    silos: Annotated[
        int | None,
        typer.Option(help="Number of clients (Flower num-supernodes). Default 5; by-user: one per user."),
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="num-server-rounds.")] = None,
    partition: Annotated[str | None, typer.Option(help="silos | by-user (data.partition).")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    cpus_per_client: Annotated[int, typer.Option(help="Ray CPUs per simulated client.")] = 1,
    verbose: Annotated[bool, typer.Option(help="Show Flower's full log stream.")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue this run directory after its last completed round (same settings; --rounds may grow)."),
    ] = None,
) -> None:
    """Run the federated app on Flower's simulation runtime (its own SuperLink)."""
    from deployment.launcher import flwr_run, superlink

    if resume is not None:
        if run_dir is not None and run_dir.resolve() != resume.resolve():
            _fail(ConfigError("--resume and --run-dir name different directories"))
        config, silos = _resume_options(resume, config, silos, rounds is not None)
        run_dir = resume
    try:
        named: dict[str, Scalar | None] = {
            "data.dataset": dataset,
            "data.path": str(data_dir) if data_dir else None,
            "num-server-rounds": rounds,
            "data.partition": partition,
            "model.name": model,
        }
        _, cfg = resolve_config(config, **named)
        if cfg.data.partition == "by-user" and cfg.data.dataset == "synthetic" and silos:
            if not any(o.startswith("data.synthetic.num-users") for o in config or []):
                named["data.synthetic.num-users"] = silos
        run_config, cfg = resolve_config(config, **named)
        num_clients = preflight(cfg, silos)
    except FedrecError as e:
        _fail(e)
    out = _run_dir(run_dir, cfg.data.dataset)
    if resume is None and (out / "metrics.jsonl").exists():
        _fail(ConfigError(f"{out} already holds a run (metrics.jsonl exists); choose another --run-dir or --resume it"))
    run_config["run-dir"] = str(out.resolve())
    run_config["resume"] = resume is not None
    if not run_config.get("state-root"):
        # Silos keep durable state (user rows, accountant, ledger) beside the run, so
        # a resumed simulation continues their budgets instead of starting over.
        run_config["state-root"] = str((out / "silos").resolve())
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulation.json").write_text(json.dumps({"clients": num_clients}) + "\n")
    console.print(
        f"[bold]fedrec simulate[/]: {cfg.data.dataset}, {num_clients} clients "
        f"({cfg.data.partition}), {cfg.num_server_rounds} rounds, model {cfg.model.name}"
    )
    console.print(f"run directory: {out}")
    log_path = out / "flower.log"
    # A SIGTERM must unwind like Ctrl-C so the SuperLink we started is stopped.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        with superlink(out / "flower", simulation=True) as link, log_path.open("w") as log:

            def show(line: str) -> None:
                log.write(line)
                log.flush()
                if verbose or _PROGRESS.search(line):
                    sys.stdout.write(line)
                    sys.stdout.flush()

            rc = flwr_run(
                link.flwr_home,
                run_config=run_config,
                federation_config=(
                    f"num-supernodes={num_clients} client-resources-num-cpus={cpus_per_client}"
                ),
                on_line=show,
            )
    except FedrecError as e:
        _fail(e)
    metrics_file = out / "metrics.jsonl"
    if rc != 0 or not metrics_file.exists():
        err.print(f"[bold red]error:[/] the Flower run failed (exit code {rc}); full log: {log_path}")
        raise typer.Exit(1)
    rounds_done = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    state_file = out / "state.json"
    stop_reason = json.loads(state_file.read_text()).get("stop-reason") if state_file.exists() else None
    if len(rounds_done) < cfg.num_server_rounds and not stop_reason:
        err.print(
            f"[bold red]error:[/] only {len(rounds_done)} of {cfg.num_server_rounds} rounds "
            f"completed; full log: {log_path}"
        )
        raise typer.Exit(1)
    _print_rounds(rounds_done, cfg.eval.k)
    if cfg.privacy.mode != "none":
        _print_privacy(rounds_done)
    if stop_reason:
        console.print(f"[bold yellow]stopped after round {len(rounds_done)}:[/] {stop_reason}")
    console.print(f"report: {out / 'report.md'}")


def _resume_options(
    run_dir: Path, config: list[str] | None, silos: int | None, new_rounds: bool
) -> tuple[list[str], int | None]:
    """The original run's settings (from its config.json), then the user's overrides."""
    path = run_dir / "config.json"
    try:
        original = json.loads(path.read_text())["run-config"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        _fail(ConfigError(f"--resume: {path} is missing or unreadable ({exc}): not a fedrec run directory"))
    overrides_file = run_dir / "resume-overrides.toml"
    from deployment.launcher import toml_value

    drop = {"resume", "run-dir", *(["num-server-rounds"] if new_rounds else [])}
    keep = {k: v for k, v in original.items() if k not in drop}
    overrides_file.write_text("".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in sorted(keep.items())))
    sim = run_dir / "simulation.json"
    clients = json.loads(sim.read_text()).get("clients") if sim.exists() else None
    return [str(overrides_file), *(config or [])], silos or clients


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def preflight(cfg: AppConfig, silos: int | None) -> int:
    """Load and partition the data once before launching; return the client count."""
    interactions = load_interactions(cfg.data, cfg.seed)
    data = split_interactions(cfg.data, cfg.seed, interactions)
    if cfg.data.partition == "by-user":
        num_clients = silos or data.split.num_users
    else:
        num_clients = silos or 5
    partition_users(
        data.split,
        scheme=cfg.data.partition,
        num_partitions=num_clients,
        seed=derive_seed(cfg.seed, "partition"),
        skew=cfg.data.skew,
        alpha=cfg.data.dirichlet_alpha,
        item_category=interactions.item_category,
    )
    if num_clients < cfg.strategy.min_nodes:
        raise ConfigError(
            f"strategy.min-nodes is {cfg.strategy.min_nodes} but only {num_clients} clients run"
        )
    return num_clients


def _print_rounds(rounds: list[dict[str, object]], k: int) -> None:
    table = Table(title="fedrec: per-round results (federated evaluation)")
    keys = [f"val-hr@{k}", f"test-hr@{k}", f"test-ndcg@{k}", "test-full-recall@20"]
    for col in ["round", "train loss", *keys, "seconds"]:
        table.add_column(col, justify="right")
    for r in rounds:
        e = r["evaluate"]
        assert isinstance(e, dict)
        t = r["train"]
        assert isinstance(t, dict)
        table.add_row(
            str(r["round"]),
            _f(t.get("train-loss")),
            *(_f(e.get(key)) for key in keys),
            f"{r['seconds']:.1f}",
        )
    console.print(table)


def _print_privacy(rounds: list[dict[str, Any]]) -> None:
    """ε after each round, per silo (local DP) and for the server (central DP)."""
    silos = sorted({int(e["partition-id"]) for r in rounds for e in r.get("privacy", [])})
    central = any(r.get("central-privacy") for r in rounds)
    if not silos and not central:
        return
    first = next((e for r in rounds for e in r.get("privacy", [])), None)
    title = "fedrec: ε after each round (* = silo declined: budget)"
    if first is not None:
        title += f" — local: unit {first['unit']}, δ={first['delta']:.1e}, {first['accountant'].upper()}"
    table = Table(title=title)
    table.add_column("round", justify="right")
    for s in silos:
        table.add_column(f"silo {s}", justify="right")
    if central:
        table.add_column("central (unit: silo)", justify="right")
    for r in rounds:
        by_silo = {int(e["partition-id"]): e for e in r.get("privacy", [])}
        cells = [
            "-" if s not in by_silo else f"{by_silo[s]['epsilon']:.3f}{'' if by_silo[s]['trained'] else '*'}"
            for s in silos
        ]
        if central:
            c = r.get("central-privacy")
            cells.append(f"{c['epsilon']:.3f}" if c else "-")
        table.add_row(str(r["round"]), *cells)
    console.print(table)


def _f(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"


@app.command()
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
        _fail(e)
    n_epochs = epochs or cfg.num_server_rounds * cfg.train.local_epochs
    out = _run_dir(run_dir, f"centralized-{cfg.data.dataset}")
    out.mkdir(parents=True, exist_ok=True)
    k = cfg.eval.k
    name = model or cfg.model.name
    console.print(f"[bold]fedrec centralized[/]: {cfg.data.dataset}, model {name}, {n_epochs} epochs")
    lines = (out / "metrics.jsonl").open("w")

    def on_epoch(r: EpochResult) -> None:
        m = r.metrics
        lines.write(json.dumps({"epoch": r.epoch, "loss": r.loss, "seconds": r.seconds, **m}) + "\n")
        lines.flush()
        console.print(
            f"epoch {r.epoch}: loss {_f(r.loss)} | val-hr@{k} {_f(m[f'val-hr@{k}'])} | "
            f"test-hr@{k} {_f(m[f'test-hr@{k}'])} | test-ndcg@{k} {_f(m[f'test-ndcg@{k}'])} | "
            f"test-full-recall@20 {_f(m.get('test-full-recall@20'))}"
        )

    try:
        results = run_centralized(cfg, n_epochs, model_name=name, on_epoch=on_epoch)
    except FedrecError as e:
        _fail(e)
    finally:
        lines.close()
    best = best_epoch(results, k) if name != "popularity" else results[-1]
    summary = {"model": name, "best-epoch": best.epoch, **best.metrics}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(
        f"best validation epoch {best.epoch}: test HR@{k} {_f(best.metrics[f'test-hr@{k}'])}, "
        f"NDCG@{k} {_f(best.metrics[f'test-ndcg@{k}'])}, "
        f"Recall@20 {_f(best.metrics.get('test-full-recall@20'))}"
    )
    console.print(f"results: {out}")


app.command()(audit)
app.add_typer(data_app, name="data", help="Prepare data for deployment: one directory per silo.")
app.add_typer(deploy_app, name="deploy", help="Run on real Flower processes: SuperLink, SuperNodes, TLS, node auth.")


def main() -> None:
    """Entry point of the ``fedrec`` console script."""
    try:
        app()
    except subprocess.SubprocessError as e:  # pragma: no cover - process plumbing
        _fail(e)


if __name__ == "__main__":
    main()
