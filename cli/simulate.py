"""``fedrec simulate``: the federated app on Flower's simulation runtime (its own SuperLink)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated

import typer

from cli.config import preflight
from cli.options import ConfigOpt, DataDirOpt, DatasetOpt, ModelOpt, RoundsOpt, RunDirOpt
from cli.output import console, fail, is_progress
from cli.progress import RunProgress, rounds_done
from cli.runs import choose_run_dir, refuse_existing_run, run_dir_session, summarise_run, unwind_on_sigterm
from common.config import AppConfig
from common.errors import ConfigError, FedrecError
from common.run_config import Scalar, collect_overrides, load_default_run_config, merge_overrides
from common.rundir import RunDir, RunDirError


def simulate(
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    silos: Annotated[
        int | None,
        typer.Option(min=1, help="Number of clients (Flower num-supernodes). Default 5; by-user: one per user."),
    ] = None,
    rounds: RoundsOpt = None,
    partition: Annotated[str | None, typer.Option(help="silos | by-user (data.partition).")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    cpus_per_client: Annotated[int, typer.Option(min=1, help="Ray CPUs per simulated client.")] = 1,
    gpus_per_client: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Ray GPUs per simulated client (fractions share a GPU, e.g. 0.25: four clients per GPU); "
            "0 = none. Training, the DP step and evaluation run on CUDA when a client has one.",
        ),
    ] = 0.0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Join this existing Ray cluster (host:port of its head, or 'auto') instead of starting "
            "Ray on this machine (docs/scale.md).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's full log stream.")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue this run directory after its last completed round (same settings; --rounds may grow)."
        ),
    ] = None,
) -> None:
    """Run the federated app on Flower's simulation runtime (its own SuperLink)."""
    console.print("fedrec simulate: reading the configuration and the data …", highlight=False)
    original: dict[str, Scalar] = {}
    try:
        check_ray_address(ray_address)
        if gpus_per_client > 0 and ray_address is None:
            check_local_gpu(gpus_per_client)
        if resume is not None:
            if run_dir is not None and run_dir.resolve() != resume.resolve():
                raise ConfigError("--resume and --run-dir name different directories")
            original, clients = _original_settings(RunDir(resume.resolve()), new_rounds=rounds is not None)
            if silos is not None and clients is not None and silos != clients:
                raise ConfigError(f"--silos {silos}: the run to resume has {clients} clients; a resumed run keeps them")
            silos = silos if silos is not None else clients
            run_dir = resume
        named: dict[str, Scalar | None] = {
            "data.dataset": dataset,
            "data.path": str(data_dir.expanduser().resolve()) if data_dir else None,
            "num-server-rounds": rounds,
            "data.partition": partition,
            "model.name": model,
        }
        for key, value in named.items():
            if value is not None and key in original and original[key] != value:
                raise ConfigError(
                    f"--resume: {key} was {original[key]!r}, not {value!r}; a resumed run keeps its "
                    "settings (only --rounds may change)"
                )
        values = collect_overrides(config, {**named, **original})  # -c overrides win over both
        defaults = load_default_run_config()
        given = {**defaults, **values}  # not yet validated: only picks what depends on it
        if given["data.partition"] == "by-user" and given["data.dataset"] == "synthetic" and silos:
            # One synthetic user per client unless an override sets the number of users.
            values = {"data.synthetic.num-users": silos, **values}
        run = choose_run_dir(run_dir, str(given["data.dataset"]))
        values["run-dir"] = str(run.path)
        values["resume"] = resume is not None
        if not given["state-root"]:
            # Silos keep durable state (user rows, accountant, ledger) beside the run, so
            # a resumed simulation continues their budgets instead of starting over.
            values["state-root"] = str(run.silo_states.resolve())
        run_config = merge_overrides(defaults, values)
        cfg = AppConfig.from_run_config(run_config)
        num_clients = preflight(cfg, silos)
        num_nodes = simulated_nodes(cfg, num_clients)
    except FedrecError as e:
        fail(e)
    from common.storage import atomic_write_bytes
    from deployment.launcher import flwr_run, superlink, write_run_config

    with run_dir_session(run):
        if resume is None:
            try:
                refuse_existing_run(run, "choose another --run-dir or --resume it")
            except ConfigError as e:
                fail(e)
        else:
            write_run_config(run.resume_overrides, original)  # the settings this resume replays
        atomic_write_bytes(run.simulation, (json.dumps({"clients": num_clients}) + "\n").encode())
        console.print(
            f"[bold]fedrec simulate[/]: {cfg.data.dataset}, {num_clients} clients "
            f"({cfg.data.partition}{'' if num_nodes == num_clients else f', {num_nodes} nodes'}), "
            f"{cfg.num_server_rounds} rounds, model {cfg.model.name}"
        )
        console.print(f"run directory: {run.path}")

        # The simulation process starts Ray (fork + exec) while the ServerApp thread may be in
        # numpy's OpenBLAS (building the data set): a fork during a multi-threaded BLAS call
        # deadlocked the process until Flower failed the run ("No heartbeat received from the
        # task"; 10,000 by-user clients). One BLAS thread there has no pool to deadlock on;
        # Ray gives the client actors their own thread settings.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        if ray_address is not None:
            # Flower's Ray backend calls ray.init() without an address, which joins
            # the cluster named by RAY_ADDRESS; the SuperLink and the simulation it
            # starts inherit this environment.
            os.environ["RAY_ADDRESS"] = ray_address
        done_before = rounds_done(run.metrics) if resume is not None else 0
        progress = RunProgress(
            console, total_rounds=cfg.num_server_rounds, metrics=run.metrics, first_round=done_before
        )

        def show(line: str) -> None:
            if verbose or is_progress(line):
                progress.print_line(line)
            if run_started(line):
                ray = f"joining Ray at {ray_address}" if ray_address else "starting Ray"
                progress.phase(f"{ray} and {num_clients} clients, round {done_before + 1}/{cfg.num_server_rounds}")

        unwind_on_sigterm()
        try:
            with progress:
                progress.phase("starting the SuperLink")
                with superlink(run.flower_dir, simulation=True) as link:
                    progress.phase("submitting the run")
                    progress.watch()
                    rc = flwr_run(
                        link.flwr_home,
                        run_config=run_config,
                        federation_config=federation_config(num_nodes, cpus_per_client, gpus_per_client),
                        log=run.flower_log,
                        append=False,
                        on_line=show,
                    )
        except FedrecError as e:
            fail(e)
        summarise_run(
            run, rc, num_rounds=cfg.num_server_rounds, k=cfg.eval.k, privacy_mode=cfg.privacy.mode,
            logs=f"full log: {run.flower_log}",
        )


def simulated_nodes(cfg: AppConfig, num_clients: int) -> int:
    """Flower's ``num-supernodes``: one per client, or ⌈clients / K⌉ with ``simulation.clients-per-node`` K."""
    k = cfg.simulation.clients_per_node
    if k == 1:
        return num_clients
    nodes = -(-num_clients // k)
    if nodes < cfg.strategy.min_nodes:
        raise ConfigError(
            f"simulation.clients-per-node = {k} packs {num_clients} clients into {nodes} node(s), fewer than "
            f"strategy.min-nodes = {cfg.strategy.min_nodes} (which counts nodes); lower one of them"
        )
    return nodes


def federation_config(num_clients: int, cpus_per_client: int, gpus_per_client: float) -> str:
    """``flwr run --federation-config``: clients and each client's Ray resources.

    ``client-resources-num-gpus`` is given only when positive (Flower's default is 0).
    """
    if gpus_per_client < 0:
        raise ConfigError(f"--gpus-per-client must be >= 0, got {gpus_per_client}")
    parts = [f"num-supernodes={num_clients}", f"client-resources-num-cpus={cpus_per_client}"]
    if gpus_per_client > 0:
        parts.append(f"client-resources-num-gpus={float(gpus_per_client)!r}")
    return " ".join(parts)


def run_started(line: str) -> bool:
    """Whether a line of ``flwr run`` says the SuperLink accepted the run (Ray starts next)."""
    return "Successfully started run" in line


def check_ray_address(address: str | None) -> None:
    """Refuse a malformed ``--ray-address``, or a ``host:port`` nothing listens on (clear error, no hang)."""
    if address is None or address == "auto":
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "://" in host:
        raise ConfigError(f"--ray-address {address!r}: expected host:port of a Ray head (or 'auto')")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(
            f"--ray-address {address}: no Ray head answers there ({e.strerror or e}); start one with "
            f"`ray start --head --port {port}` or fix the address"
        ) from None


def check_local_gpu(gpus_per_client: float) -> None:
    """Refuse ``--gpus-per-client`` on a machine without CUDA (Ray would never schedule the clients)."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"--gpus-per-client {gpus_per_client:g}: this machine has no CUDA device "
            "(torch.cuda.is_available() is False); Ray could never place the clients"
        )


def _original_settings(run: RunDir, *, new_rounds: bool) -> tuple[dict[str, Scalar], int | None]:
    """The original run's settings (its ``config.json``) and its number of clients.

    The settings go under the user's ``-c`` overrides (which win); ``num-server-rounds``
    is left out when ``--rounds`` is given. Nothing is written here: the directory is
    not locked yet.
    """
    try:
        original = run.read_config().run_config
        clients = run.read_simulation_clients()
    except RunDirError as e:
        raise ConfigError(f"--resume: {e}") from None
    drop = {"resume", "run-dir", *(["num-server-rounds"] if new_rounds else [])}
    return {k: v for k, v in sorted(original.items()) if k not in drop}, clients
