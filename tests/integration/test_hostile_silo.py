"""A real deployment (TLS SuperLink, node auth, 3 SuperNodes) with one silo that always replies garbage."""

import shutil
import tomllib
from pathlib import Path

import pytest

from common.rundir import RunDir
from deployment.launcher import REPO, flower_bin
from deployment.local import LocalDeployment

pytestmark = [pytest.mark.runtime, pytest.mark.slow]

HOSTILE_SILO = 1

# The ClientApp of the test's app bundle: fedrec's own, except that silo 1 corrupts every
# reply it sends (a test double shipped only in this temporary bundle, never in fedrec's).
HOSTILE_APP = '''
"""fedrec's ClientApp, except that silo {silo} sends malformed replies."""

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import app as fedrec

app = ClientApp()


def _hostile(context):
    return int(context.node_config["partition-id"]) == {silo}


@app.train()
def train(msg, context):
    reply = fedrec.train(msg, context)
    if not _hostile(context):
        return reply
    arrays = reply.content.array_records["arrays"]
    garbage = {{name: Array(np.full(arr.shape, np.nan, dtype=np.float32)) for name, arr in arrays.items()}}
    garbage["user_embedding.weight"] = Array(np.ones((3, 2), dtype=np.float32))
    content = RecordDict({{
        "arrays": ArrayRecord(garbage),
        "metrics": MetricRecord({{"num-examples": 1e30, "train-seconds": 0.0}}),
        "privacy": ConfigRecord({{"owner": "silo-{silo}", "epsilon": -1.0}}),
    }})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg, context):
    reply = fedrec.evaluate(msg, context)
    if not _hostile(context):
        return reply
    return Message(content=RecordDict({{"metrics": MetricRecord({{"test-users": 1e30}})}}), reply_to=msg)
'''


def _hostile_bundle(directory: Path) -> Path:
    """fedrec's app sources plus the hostile ClientApp, with a pyproject naming it."""
    for package in ("common", "client", "server"):
        shutil.copytree(REPO / package, directory / package, ignore=shutil.ignore_patterns("__pycache__"))
    (directory / "hostile_app.py").write_text(HOSTILE_APP.format(silo=HOSTILE_SILO))
    text = (REPO / "pyproject.toml").read_text()
    assert 'clientapp = "client.app:app"' in text
    text = text.replace('clientapp = "client.app:app"', 'clientapp = "hostile_app:app"')
    text = text.replace('fab-include = [', 'fab-include = ["hostile_app.py", ', 1)
    tomllib.loads(text)  # still valid TOML
    (directory / "pyproject.toml").write_text(text)
    (directory / "README.md").write_text("fedrec with one hostile silo (test bundle)\n")
    return directory


def test_a_silo_sending_garbage_every_round_is_named_and_the_others_finish_the_run(tmp_path: Path):
    # Arrange
    for name in ("flower-superlink", "flower-supernode", "flwr"):
        flower_bin(name)
    bundle = _hostile_bundle(tmp_path / "bundle")
    run_dir = tmp_path / "run"
    config = {
        "num-server-rounds": 3,
        "run-dir": str(run_dir),
        "data.synthetic.num-users": 300,
        "data.synthetic.num-items": 300,
        "model.dim": 8,
    }
    lines: list[str] = []
    # Act
    with LocalDeployment(tmp_path / "deployment", 3) as dep:
        rc = dep.run_app(config, app_dir=bundle, on_line=lines.append, timeout=900)
    # Assert: all rounds completed from the two honest silos; the hostile one is named each round.
    assert rc == 0, "".join(lines)[-3000:]
    rounds = RunDir(run_dir).read_rounds()
    assert [r.server_round for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert r.train["silos"] == 2 and r.evaluate["silos"] == 2
        reasons = [reason for _, reason in r.rejected]
        assert len(reasons) == 2, reasons  # its training reply and its evaluation reply
        assert any(reason.startswith("privacy record invalid") for reason in reasons)
        assert any(reason.startswith("evaluation: evaluation sums have unexpected keys") for reason in reasons)
    report = RunDir(run_dir).report.read_text()
    assert "privacy record invalid" in report
