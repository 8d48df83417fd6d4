"""The shell recipe that runs the same federation on separate machines."""

from __future__ import annotations

import shlex
from collections.abc import Mapping

from deployment.launcher import CONNECTION, run_config_text
from deployment.tuning import TUNED, Tuning


def multi_machine_commands(
    num_silos: int,
    *,
    superlink_host: str,
    port: int = 8000,
    run_overrides: Mapping[str, object] | None = None,
    tuning: Tuning = TUNED,
    tls: bool = True,
    auth: bool = True,
    data_root: str | None = None,
    state_root: str = "/srv/fedrec/state",
) -> str:
    """The commands that run the same federation on separate machines, as a shell recipe.

    One SuperLink host, one SuperNode per silo host, and a workstation with this
    repository that submits the run with ``flwr run``.
    """
    link = f"{superlink_host}:{port}"
    env = " ".join(f"{k}={v}" for k, v in tuning.env().items())
    env = f"{env} " if env else ""
    isolation = "" if tuning.supernode_isolation == "subprocess" else " --isolation process"
    out: list[str] = [
        f"# fedrec across machines: 1 SuperLink host, {num_silos} silo hosts, 1 workstation.",
        "# Every host: Python >= 3.11 with fedrec installed (pip install -e <this repo>), so the",
        "# apps' dependencies (torch, opacus, ...) are there: nothing is installed at run time.",
        f"# {superlink_host} is the name or IP address the silos and the workstation dial.",
        "",
    ]
    if tls:
        out += [
            "## 1. SuperLink host: a CA and the SuperLink's certificate (SAN = the host above)",
            f"fedrec deploy certs --out credentials --host {superlink_host}",
            "#   credentials/ca.crt       public: copy to every silo host and the workstation",
            "#   credentials/server.crt   public: the SuperLink's certificate",
            "#   credentials/server.key   private (0600): stays on the SuperLink host",
            "#   credentials/ca.key       private (0600): keep it offline; it can sign certificates",
            "#   (the certificate also names 127.0.0.1: the SuperLink's own SuperExec and ServerApp",
            "#    dial 127.0.0.1:<port> with TLS when it listens on 0.0.0.0)",
            "",
        ]
    if auth:
        out.append(
            "## 2. Each silo host: create the node's key pair; send only the .pub to the operator"
        )
        out += [f"fedrec deploy node-key supernode-{i}    # on silo host {i}" for i in range(num_silos)]
        out += [
            "#   supernode-<i>      private OpenSSH ECDSA P-384 key (0600): never leaves the silo",
            "#   supernode-<i>.pub  public key: goes to the SuperLink operator for registration",
            '#   (same as: ssh-keygen -t ecdsa -b 384 -N "" -f supernode-<i>)',
            "",
        ]
    superlink_args = (
        ["--ssl-ca-certfile", "credentials/ca.crt", "--ssl-certfile", "credentials/server.crt",
         "--ssl-keyfile", "credentials/server.key"]
        if tls else ["--insecure"]
    )
    if auth:
        superlink_args.append("--enable-supernode-auth")
    superlink_args += ["--host", "0.0.0.0", "--port", str(port),
                       "--disable-runtime-dependency-installation", "--database", "superlink.db"]
    out += [
        "## 3. SuperLink host: start the SuperLink (Fleet, Control and Runtime APIs on one port)",
        shlex.join(["flower-superlink", *superlink_args]),
        f"#   open TCP {port} to the silo hosts and the workstation; results (run-dir) land here.",
        "",
        "## 4. Workstation (a checkout of this repo, ca.crt copied from the SuperLink host):",
        "#    a Flower home of its own with the connection (keep this FLWR_HOME for step 6)",
        'export FLWR_HOME="$PWD/flwr-home" && mkdir -p "$FLWR_HOME"',
        'cat > "$FLWR_HOME/config.toml" <<EOF',
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{link}"',
        'root-certificates = "$PWD/ca.crt"' if tls else "insecure = true",
        "EOF",
    ]
    if auth:
        out.append("#    register each silo's public key (the node ID it prints is the silo's identity)")
        out += [f"flwr supernode register supernode-{i}.pub {CONNECTION}" for i in range(num_silos)]
    out += ["", "## 5. Silo host i: start its SuperNode (one per silo)"]
    if tuning.persistent:
        out.append(
            "#    and beside it, in the fedrec checkout, the long-lived process that runs its"
            " ClientApp messages"
        )
    for i in range(num_silos):
        node_config = f"partition-id={i} num-partitions={num_silos}"
        if data_root is not None:
            node_config += f' data-path="{data_root}/silo-{i}"'
        node_config += f' state-dir="{state_root}/silo-{i}"'
        args = ["flower-supernode", "--superlink", link]
        args += ["--root-certificates", "ca.crt"] if tls else ["--insecure"]
        if auth:
            args += ["--auth-supernode-private-key", f"supernode-{i}"]
        args += ["--node-config", node_config]
        out.append(f"{env}{shlex.join(args)}{isolation} --host 127.0.0.1 --port 9094   # silo {i}")
        if isolation:
            runner = (
                shlex.join(["python", "-m", "deployment.clientapp_host",
                            "--runtime-api-address", "127.0.0.1:9094", *tuning.host_args()])
                if tuning.persistent
                else "flower-superexec --insecure --runtime-api-address 127.0.0.1:9094"
            )
            out.append(f"{env}{runner}   # silo {i}")
    out += ["", "## 6. Workstation: run the app (run-dir is a path on the SuperLink host)"]
    overrides = dict(run_overrides or {})
    if overrides:
        out.append("cat > run-config.toml <<EOF")
        out += run_config_text(overrides).splitlines()
        out += ["EOF", f"flwr run . {CONNECTION} --stream --run-config run-config.toml"]
    else:
        out.append(f"flwr run . {CONNECTION} --stream")
    return "\n".join(out) + "\n"
