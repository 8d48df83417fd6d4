"""``fedrec deploy``: the app on real Flower processes (SuperLink + SuperNodes), TLS, node auth."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.config import preflight
from cli.options import ConfigOpt, RoundsOpt
from cli.output import console, err, fail, is_progress, os_errors
from cli.runs import choose_run_dir, refuse_existing_run, run_dir_session, summarise_run, unwind_on_sigterm
from common.config import AppConfig
from common.errors import ConfigError, FedrecError
from common.run_config import Scalar, collect_overrides, load_default_run_config, merge_overrides
from common.rundir import RunDir
from deployment.pki import SERVER_HOSTS
from deployment.tuning import FLOWER_DEFAULTS, TUNED, Tuning

deploy_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run the app on real Flower processes (SuperLink + SuperNodes) with TLS and node auth.",
)


@deploy_app.command()
def local(
    silos: Annotated[int, typer.Option(min=1, help="Number of SuperNodes (one per silo).")] = 3,
    tls: Annotated[bool, typer.Option("--tls/--insecure", help="TLS on the SuperLink.")] = True,
    auth: Annotated[
        bool, typer.Option("--auth/--no-auth", help="SuperNode authentication (needs TLS).")
    ] = True,
    rounds: RoundsOpt = None,
    config: ConfigOpt = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Where to write the run (default runs/<time>-deploy).")
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(help="Per-silo data: SuperNode i gets data-path=<data-root>/silo-<i>."),
    ] = None,
    state_root: Annotated[
        Path | None,
        typer.Option(help="SuperNode i gets state-dir=<state-root>/silo-<i> (default <run-dir>/silos)."),
    ] = None,
    print_commands: Annotated[
        bool, typer.Option("--print-commands", help="Print the multi-machine commands instead of starting anything.")
    ] = False,
    superlink_host: Annotated[
        str, typer.Option(help="--print-commands: the SuperLink's name or IP address.")
    ] = "SUPERLINK_HOST",
    flower_defaults: Annotated[
        bool,
        typer.Option(
            "--flower-defaults",
            help="Flower's settings (a fresh flwr-clientapp per message) instead of fedrec's persistent ClientApps.",
        ),
    ] = False,
    superexec_poll: Annotated[
        float | None,
        typer.Option(
            min=0.01, max=60.0,
            help="Seconds between polls for ClientApp tasks (fedrec's ClientApp host: 0.1; Flower's SuperExec: 1).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's full log stream.")] = False,
) -> None:
    """Start a SuperLink and one SuperNode per silo on 127.0.0.1, run the app, stop all."""
    from deployment.supernode import silo_dir

    tuning = FLOWER_DEFAULTS if flower_defaults else TUNED
    if superexec_poll is not None:
        tuning = dataclasses.replace(tuning, superexec_poll_interval=superexec_poll)
    run = choose_run_dir(run_dir, "deploy")
    try:
        if auth and not tls:
            raise ConfigError("SuperNode authentication needs TLS: drop --insecure or add --no-auth")
        # One exchange per round (eval.fused; -c eval.fused=false for two): every exchange costs a
        # deployment ~3 s of Flower's SuperNode idle poll (docs/deployment.md#round-time).
        values = collect_overrides(config, {"eval.fused": True, "num-server-rounds": rounds})
        if not print_commands:
            values["run-dir"] = str(run.path)
        run_config = merge_overrides(load_default_run_config(), values)
        cfg = AppConfig.from_run_config(run_config)
        if data_root is not None:
            missing = [i for i in range(silos) if not silo_dir(data_root, i).is_dir()]
            if missing:
                raise ConfigError(
                    f"{silo_dir(data_root, missing[0])} does not exist: prepare the silos' data "
                    f"first (fedrec data prepare --out {data_root} ...)"
                )
            if silos < cfg.strategy.min_nodes:
                raise ConfigError(f"strategy.min-nodes is {cfg.strategy.min_nodes} but only {silos} silos run")
        else:
            preflight(cfg, silos)
    except FedrecError as e:
        fail(e)
    if print_commands:
        _print_commands(run_config, silos, superlink_host, tuning, tls, auth, data_root, state_root)
        return
    with run_dir_session(run):
        try:
            refuse_existing_run(run, "choose another --run-dir")
        except ConfigError as e:
            fail(e)
        _deploy(run, run_config, cfg, silos, tls=tls, auth=auth, tuning=tuning, flower_defaults=flower_defaults,
                data_root=data_root, state_root=state_root, verbose=verbose)


def _deploy(
    run: RunDir,
    run_config: dict[str, Scalar],
    cfg: AppConfig,
    silos: int,
    *,
    tls: bool,
    auth: bool,
    tuning: Tuning,
    flower_defaults: bool,
    data_root: Path | None,
    state_root: Path | None,
    verbose: bool,
) -> None:
    """Start the federation in ``run`` (locked by the caller), run the app, stop all."""
    console.print(
        f"[bold]fedrec deploy local[/]: {silos} SuperNodes, {cfg.num_server_rounds} rounds, "
        f"TLS {'on' if tls else 'off'}, node auth {'on' if auth else 'off'}, "
        f"{'Flower default' if flower_defaults else 'fedrec'} latency settings ({_describe(tuning)})"
    )
    console.print(f"run directory: {run.path}")
    from deployment.local import LocalDeployment
    from deployment.processes import LaunchError

    unwind_on_sigterm()
    dep = LocalDeployment(run.path, silos, tls=tls, auth=auth, tuning=tuning, data_root=data_root,
                          state_root=state_root, start_supernodes=False)
    try:
        with dep:
            console.print(f"SuperLink {dep.address} (log {dep.superlink_log})")
            if dep.node_ids:
                console.print(f"registered node keys: {len(dep.node_ids)} in {dep.credentials.directory}")
            dep.start_all_supernodes()
            for i, node in sorted(dep.supernodes.items()):
                console.print(f"SuperNode {i}: PID {node.proc.pid}, log {node.log}")

            def show(line: str) -> None:
                if verbose or is_progress(line):
                    sys.stdout.write(line)
                    sys.stdout.flush()

            rc = dep.run_app(run_config, on_line=show)
    except LaunchError as e:
        fail(e, 1)
    except KeyboardInterrupt:
        err.print(f"[bold yellow]interrupted[/]: every process stopped; logs in {dep.log_dir}")
        raise typer.Exit(130) from None
    summarise_run(
        run, rc, num_rounds=cfg.num_server_rounds, k=cfg.eval.k, privacy_mode=cfg.privacy.mode,
        logs=f"logs: {dep.files.flwr_run_log}, {dep.log_dir}",
    )


def _print_commands(
    run_config: dict[str, Scalar],
    silos: int,
    superlink_host: str,
    tuning: Tuning,
    tls: bool,
    auth: bool,
    data_root: Path | None,
    state_root: Path | None,
) -> None:
    """The multi-machine recipe for this run config: its overrides of the defaults only."""
    from deployment.recipe import multi_machine_commands

    defaults = load_default_run_config()
    overrides = {k: v for k, v in run_config.items() if defaults.get(k) != v}
    overrides.setdefault("run-dir", "/srv/fedrec/runs/deploy")
    sys.stdout.write(
        multi_machine_commands(
            silos, superlink_host=superlink_host, run_overrides=overrides, tuning=tuning,
            tls=tls, auth=auth, data_root=str(data_root.resolve()) if data_root else None,
            state_root=str(state_root.resolve()) if state_root else "/srv/fedrec/state",
        )
    )


def _describe(tuning: Tuning) -> str:
    return tuning.describe()


@deploy_app.command()
def certs(
    out: Annotated[Path, typer.Option(help="Directory for ca.crt/ca.key/server.crt/server.key.")],
    host: Annotated[
        list[str], typer.Option(help="SuperLink host name or IP address (repeatable).")
    ] = list(SERVER_HOSTS),  # noqa: B006 - typer needs a literal default
) -> None:
    """Create a CA and a SuperLink certificate for HOST (kept if they already exist)."""
    from deployment.pki import create_ca, create_server_certificate

    # 127.0.0.1 always: a SuperLink bound to 0.0.0.0 has its SuperExec and ServerApp dial
    # 127.0.0.1:<port> over TLS, which fails unless the certificate names that address.
    hosts = list(dict.fromkeys([*host, *SERVER_HOSTS]))
    with os_errors(out):
        creds = create_ca(out)
        create_server_certificate(creds, hosts)
    typer.echo(f"CA: {creds.ca_cert} (private key {creds.ca_key})")
    typer.echo(f"SuperLink: {creds.server_cert} (private key {creds.server_key}), SAN {', '.join(hosts)}")


@deploy_app.command("node-key")
def node_key(
    path: Annotated[Path, typer.Argument(help="Private key file; the public key goes to PATH.pub.")],
) -> None:
    """Create a SuperNode's ECDSA P-384 key pair (OpenSSH format), as ssh-keygen would."""
    from deployment.pki import create_node_key

    with os_errors(path):
        public = create_node_key(path, comment=path.name)
    typer.echo(f"private key: {path} (0600; keep it on this host)")
    typer.echo(f"public key:  {public} (register it: flwr supernode register {public} <connection>)")
