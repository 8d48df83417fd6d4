"""``fedrec deploy``: the app on real Flower processes (SuperLink + SuperNodes), TLS, node auth.

The processes themselves are started by :mod:`deployment.local`.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from deployment.local import LocalDeployment
from deployment.pki import SERVER_HOSTS, create_ca, create_node_key, create_server_certificate
from deployment.processes import LaunchError
from deployment.recipe import multi_machine_commands
from deployment.tuning import FLOWER_DEFAULTS, TUNED, Tuning

deploy_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run the app on real Flower processes (SuperLink + SuperNodes) with TLS and node auth.",
)

_ConfigOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--config", "-c", help="Override: -c train.lr=0.005, or a TOML file of overrides (repeatable)."
    ),
]


@deploy_app.command()
def local(
    silos: Annotated[int, typer.Option(min=1, help="Number of SuperNodes (one per silo).")] = 3,
    tls: Annotated[bool, typer.Option("--tls/--insecure", help="TLS on the SuperLink.")] = True,
    auth: Annotated[
        bool, typer.Option("--auth/--no-auth", help="SuperNode authentication (needs TLS).")
    ] = True,
    rounds: Annotated[int | None, typer.Option(help="num-server-rounds.")] = None,
    config: _ConfigOpt = None,
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
        bool, typer.Option("--flower-defaults", help="Flower's latency settings instead of fedrec's tuned ones.")
    ] = False,
    superexec_poll: Annotated[
        float | None,
        typer.Option(
            min=0.01, max=60.0,
            help="Seconds between SuperExec polls for ClientApp tasks (Flower's default: 1).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's full log stream.")] = False,
) -> None:
    """Start a SuperLink and one SuperNode per silo on 127.0.0.1, run the app, stop all."""
    from common.config import load_default_run_config
    from common.errors import ConfigError, FedrecError
    from common.rundir import default_run_dir
    from simulations import cli

    tuning = FLOWER_DEFAULTS if flower_defaults else TUNED
    if superexec_poll is not None:
        tuning = dataclasses.replace(tuning, superexec_poll_interval=superexec_poll)
    try:
        if auth and not tls:
            raise ConfigError("SuperNode authentication needs TLS: drop --insecure or add --no-auth")
        run_config, cfg = cli.resolve_config(config, **{"num-server-rounds": rounds})
        if data_root is not None:
            missing = [i for i in range(silos) if not (data_root / f"silo-{i}").is_dir()]
            if missing:
                raise ConfigError(
                    f"{data_root}/silo-{missing[0]} does not exist: prepare the silos' data "
                    f"first (fedrec data prepare --out {data_root} ...)"
                )
            if silos < cfg.strategy.min_nodes:
                raise ConfigError(f"strategy.min-nodes is {cfg.strategy.min_nodes} but only {silos} silos run")
        else:
            cli.preflight(cfg, silos)
    except FedrecError as e:
        cli._fail(e)
    if print_commands:
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
        return
    out = run_dir.resolve() if run_dir is not None else default_run_dir("deploy").resolve()
    if (out / "metrics.jsonl").exists():
        cli._fail(ConfigError(f"{out} already holds a run (metrics.jsonl exists); choose another --run-dir"))
    run_config["run-dir"] = str(out)
    out.mkdir(parents=True, exist_ok=True)
    cli.console.print(
        f"[bold]fedrec deploy local[/]: {silos} SuperNodes, {cfg.num_server_rounds} rounds, "
        f"TLS {'on' if tls else 'off'}, node auth {'on' if auth else 'off'}, "
        f"{'Flower default' if flower_defaults else 'fedrec'} latency settings ({_describe(tuning)})"
    )
    cli.console.print(f"run directory: {out}")
    signal.signal(signal.SIGTERM, cli._raise_keyboard_interrupt)
    dep = LocalDeployment(out, silos, tls=tls, auth=auth, tuning=tuning, data_root=data_root,
                          state_root=state_root, start_supernodes=False)
    try:
        with dep:
            cli.console.print(f"SuperLink {dep.address} (log {dep.superlink_log})")
            if dep.node_ids:
                cli.console.print(f"registered node keys: {len(dep.node_ids)} in {dep.credentials.directory}")
            dep.start_all_supernodes()
            for i, node in sorted(dep.supernodes.items()):
                cli.console.print(f"SuperNode {i}: PID {node.proc.pid}, log {node.log}")

            def show(line: str) -> None:
                if verbose or cli._PROGRESS.search(line):
                    sys.stdout.write(line)
                    sys.stdout.flush()

            rc = dep.run_app(run_config, on_line=show)
    except LaunchError as e:
        cli.err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        cli.err.print(f"[bold yellow]interrupted[/]: every process stopped; logs in {dep.log_dir}")
        raise typer.Exit(130) from None
    _summarise(out, rc, cfg.num_server_rounds, cfg.eval.k, cfg.privacy.mode, dep.log_dir)


def _describe(tuning: Tuning) -> str:
    poll = tuning.superexec_poll_interval
    return (
        f"SuperExec poll {'1' if poll is None else f'{poll:g}'} s, "
        f"telemetry {'on' if tuning.telemetry else 'off'}"
    )


def _summarise(out: Path, rc: int, num_rounds: int, k: int, privacy_mode: str, log_dir: Path) -> None:
    """Check the run's files and print its tables, as ``fedrec simulate`` does."""
    from simulations import cli

    metrics_file = out / "metrics.jsonl"
    flwr_log = log_dir / "flwr-run.log"
    if rc != 0 or not metrics_file.exists():
        cli.err.print(f"[bold red]error:[/] the Flower run failed (exit code {rc}); logs: {flwr_log}, {log_dir}")
        raise typer.Exit(1)
    rounds_done = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    state_file = out / "state.json"
    stop_reason = json.loads(state_file.read_text()).get("stop-reason") if state_file.exists() else None
    if len(rounds_done) < num_rounds and not stop_reason:
        cli.err.print(
            f"[bold red]error:[/] only {len(rounds_done)} of {num_rounds} rounds completed; "
            f"logs: {flwr_log}, {log_dir}"
        )
        raise typer.Exit(1)
    cli._print_rounds(rounds_done, k)
    if privacy_mode != "none":
        cli._print_privacy(rounds_done)
    if stop_reason:
        cli.console.print(f"[bold yellow]stopped after round {len(rounds_done)}:[/] {stop_reason}")
    cli.console.print(f"report: {out / 'report.md'}")


@deploy_app.command()
def certs(
    out: Annotated[Path, typer.Option(help="Directory for ca.crt/ca.key/server.crt/server.key.")],
    host: Annotated[
        list[str], typer.Option(help="SuperLink host name or IP address (repeatable).")
    ] = list(SERVER_HOSTS),  # noqa: B006 - typer needs a literal default
) -> None:
    """Create a CA and a SuperLink certificate for HOST (kept if they already exist)."""
    # 127.0.0.1 always: a SuperLink bound to 0.0.0.0 has its SuperExec and ServerApp dial
    # 127.0.0.1:<port> over TLS, which fails unless the certificate names that address.
    hosts = list(dict.fromkeys([*host, *SERVER_HOSTS]))
    creds = create_ca(out)
    create_server_certificate(creds, hosts)
    typer.echo(f"CA: {creds.ca_cert} (private key {creds.ca_key})")
    typer.echo(f"SuperLink: {creds.server_cert} (private key {creds.server_key}), SAN {', '.join(hosts)}")


@deploy_app.command("node-key")
def node_key(
    path: Annotated[Path, typer.Argument(help="Private key file; the public key goes to PATH.pub.")],
) -> None:
    """Create a SuperNode's ECDSA P-384 key pair (OpenSSH format), as ssh-keygen would."""
    public = create_node_key(path, comment=path.name)
    typer.echo(f"private key: {path} (0600; keep it on this host)")
    typer.echo(f"public key:  {public} (register it: flwr supernode register {public} <connection>)")
