"""The app on a real deployment: a TLS SuperLink with node auth and 3 SuperNodes on 127.0.0.1."""

import http.client
import json
import os
import ssl
import stat
from pathlib import Path

import pytest

from deployment.launcher import flower_bin
from deployment.local import LocalDeployment
from deployment.pki import create_node_key
from deployment.processes import processes_using

pytestmark = [pytest.mark.runtime, pytest.mark.slow]

SMALL = {
    "data.synthetic.num-users": 300,
    "data.synthetic.num-items": 300,
    "model.dim": 8,
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    # No silent skip: a missing Flower executable raises LaunchError here.
    for name in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr", "flwr-clientapp"):
        flower_bin(name)
    dep = LocalDeployment(tmp_path_factory.mktemp("deploy") / "run", 3)
    with dep:
        yield dep
    # Everything we started is gone: SuperLink, its SuperExec/ServerApp, SuperNodes,
    # their SuperExecs and ClientApps (all name one of these addresses).
    addresses = [dep.address, *(n.runtime_address for n in dep.supernodes.values())]
    assert [pid for a in addresses for pid in processes_using(a)] == []


def test_three_rounds_over_tls_with_node_auth_write_metrics_and_report(deployment: LocalDeployment):
    # Arrange
    run_dir = deployment.run_dir
    lines: list[str] = []
    # Act
    rc = deployment.run_app(
        {"num-server-rounds": 3, "run-dir": str(run_dir), **SMALL}, on_line=lines.append, timeout=600
    )
    # Assert
    output = "".join(lines)
    assert rc == 0, output[-3000:]
    assert "fedrec round 3/3" in output
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert r["train"]["silos"] == 3 and r["evaluate"]["silos"] == 3
        assert {"train-loss", "num-examples"} <= r["train"].keys()
        assert {"val-hr@10", "test-hr@10", "test-ndcg@10"} <= r["evaluate"].keys()
        assert r["missing-nodes"] == [] and r["seconds"] > 0
    assert "# fedrec run report" in (run_dir / "report.md").read_text()
    run_config = json.loads((run_dir / "config.json").read_text())["run-config"]
    assert run_config["data.synthetic.num-users"] == 300 and run_config["model.dim"] == 8
    # Each silo got its own partition and state directory through --node-config.
    for i in range(3):
        assert f"partition-id={i} num-partitions=3" in deployment.node_config(i)
        assert (deployment.state_root / f"silo-{i}").is_dir()
    assert len(set(deployment.node_ids.values())) == 3


def test_a_silo_recommends_from_its_own_state_directory_after_the_deployment_run(deployment: LocalDeployment):
    # The run of the test above: each SuperNode's state-dir holds its users' rows and silo.json.
    from typer.testing import CliRunner

    from cli.main import app
    from fedrec import load

    store = deployment.state_root / "silo-1"
    rec = load(store, model=deployment.run_dir / "final.npz")
    assert rec.silo == 1 and rec.user_ids
    user = rec.user_ids[0]
    result = CliRunner().invoke(app, ["recommend", str(store), "--model", str(deployment.run_dir / "final.npz"),
                                      "--user", user, "--json"])
    assert result.exit_code == 0, result.output
    items = [e["item"] for e in json.loads(result.output)["items"]]
    seen = {str(rec.served.item_ids[i]) for i in rec.served.seen(rec.row_of(user))}
    assert len(items) == 10 == len(set(items)) and not set(items) & seen


def test_credentials_are_openssh_p384_keys_and_private_files_are_0600(deployment: LocalDeployment):
    creds = deployment.credentials
    for path in (creds.ca_key, creds.server_key, *(creds.node_key(i) for i in range(3))):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert creds.node_key(0).read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert creds.node_public_key(0).read_text().startswith("ecdsa-sha2-nistp384 ")


def test_supernode_with_an_unregistered_key_is_rejected(deployment: LocalDeployment, tmp_path: Path):
    # Arrange
    rogue = tmp_path / "rogue"
    create_node_key(rogue)
    # Act
    code, log = deployment.probe_supernode(private_key=rogue, name="rogue")
    # Assert
    assert code != 0, log
    assert "Failed to activate SuperNode" in log
    assert "SuperNode ID" not in log


def test_plain_http_to_the_tls_port_fails(deployment: LocalDeployment):
    # Act / Assert: an HTTP request gets no response from the TLS listener...
    conn = http.client.HTTPConnection("127.0.0.1", deployment.port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        conn.request("GET", "/health")
        conn.getresponse()
    conn.close()
    # ...a client that does not trust our CA fails verification...
    conn = http.client.HTTPSConnection(
        "127.0.0.1", deployment.port, timeout=10, context=ssl.create_default_context()
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/health")
    conn.close()
    # ...and one that trusts it (with hostname check on 127.0.0.1) gets through.
    trusting = ssl.create_default_context(cafile=os.fspath(deployment.credentials.ca_cert))
    conn = http.client.HTTPSConnection("127.0.0.1", deployment.port, timeout=10, context=trusting)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    # An insecure SuperNode cannot connect either.
    code, log = deployment.probe_supernode(insecure=True, name="plain")
    assert code != 0, log
    assert "Failed to initialize the connection to the SuperLink" in log


def test_print_commands_gives_every_host_its_flags_and_starts_nothing(tmp_path: Path):
    from typer.testing import CliRunner

    from cli.main import app

    # Act
    result = CliRunner().invoke(
        app,
        ["deploy", "local", "--silos", "2", "--rounds", "3", "--print-commands",
         "--superlink-host", "10.0.0.5", "--run-dir", str(tmp_path / "run"), "-c", "model.dim=8"],
    )
    # Assert
    assert result.exit_code == 0, result.output
    out = result.output
    assert "fedrec deploy certs --out credentials --host 10.0.0.5" in out
    assert "--enable-supernode-auth" in out and "--ssl-keyfile credentials/server.key" in out
    assert "--disable-runtime-dependency-installation" in out
    assert "flwr supernode register supernode-1.pub fedrec" in out
    assert "--auth-supernode-private-key supernode-1" in out and "--root-certificates ca.crt" in out
    assert "'partition-id=1 num-partitions=2 state-dir=" in out
    assert 'address = "10.0.0.5:8000"' in out
    assert "num-server-rounds = 3" in out and "model.dim = 8" in out
    assert not (tmp_path / "run").exists()


def test_certs_command_names_the_host_and_loopback(tmp_path: Path):
    from cryptography import x509
    from typer.testing import CliRunner

    from cli.main import app

    # Act
    result = CliRunner().invoke(app, ["deploy", "certs", "--out", str(tmp_path), "--host", "fl.example.org"])
    # Assert
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
