"""Bundles of a NeuMF run and of a local-DP run: the numpy score reproduces serving, the privacy statement is the ledger's."""

import json
import subprocess
import sys
import textwrap

from typer.testing import CliRunner

from cli.main import app
from common.privacy.events import silo_owner
from common.privacy.ledger import read_ledger, releases
from common.rundir import RunDir
from tests.serving.helpers import finished_run

runner = CliRunner()

NEUMF_SCRIPT = textwrap.dedent(
    """
    import json, sys, numpy as np
    from safetensors.numpy import load_file
    d = sys.argv[1]; s = load_file(f"{d}/shared.safetensors"); u = load_file(f"{d}/users.safetensors")
    r = json.load(open(f"{d}/users.json"))["ids"].index(sys.argv[2]); qg, qm = s["item_gmf.weight"], s["item_mlp.weight"]
    h = np.concatenate([np.broadcast_to(u["user_mlp.weight"][r], (len(qm), qm.shape[1])), qm], axis=1)
    for j in sorted(int(k.split(".")[1]) for k in s if k.startswith("mlp.") and k.endswith(".weight")):
        h = np.maximum(h @ s[f"mlp.{j}.weight"].T + s[f"mlp.{j}.bias"], 0)
    score = (np.concatenate([u["user_gmf.weight"][r] * qg, h], axis=1) @ s["output.weight"].T + s["output.bias"])[:, 0]
    print(json.dumps([float(x) for x in score]))
    """
)


def test_neumf_bundle_scores_are_reproduced_by_a_numpy_script(tmp_path):
    run = tmp_path / "run"
    finished_run(run, silos=2, **{"model.name": "neumf", "num-server-rounds": 1, "model.mlp-layers": "16,8"})
    bundle = tmp_path / "bundle"
    assert runner.invoke(app, ["export", str(run), "--silo", "0", "--out", str(bundle)]).exit_code == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "neumf" and manifest["model"]["mlp-layers"] == [16, 8]
    user = json.loads((bundle / "users.json").read_text())["ids"][0]
    (tmp_path / "s.py").write_text(NEUMF_SCRIPT)
    out = subprocess.run([sys.executable, str(tmp_path / "s.py"), str(bundle), user], capture_output=True, text=True, check=True)
    by_script = json.loads(out.stdout)
    served = json.loads(runner.invoke(app, ["recommend", str(bundle), "--user", user, "--json", "--include-seen", "-k", "300"]).output)
    assert len(served["items"]) == 300
    for entry in served["items"]:
        assert entry["score"] == by_script[int(entry["item"][1:])]  # synthetic item "i<k>" is row k


def test_export_of_a_local_dp_run_states_the_silos_unit_epsilon_delta_and_accountant_from_its_ledger(tmp_path):
    run = tmp_path / "run"
    finished_run(run, silos=2, **{"num-server-rounds": 1, "privacy.mode": "local", "privacy.local.noise-multiplier": 1.2,
                                  "privacy.local.target-epsilon": 0.0, "privacy.local.batch-size": 20})
    bundle = tmp_path / "bundle"
    result = runner.invoke(app, ["export", str(run), "--silo", "1", "--out", str(bundle)])
    assert result.exit_code == 0, result.output
    privacy = json.loads((bundle / "manifest.json").read_text())["privacy"]
    (last,) = releases(read_ledger(RunDir(run).silo_ledger(1), silo_owner(1)))
    assert privacy["mode"] == "local"
    assert privacy["local"]["unit"] == last.unit == "user"
    assert privacy["local"]["epsilon"] == last.epsilon and privacy["local"]["delta"] == last.delta
    assert privacy["local"]["accountant"] == last.accountant == "pld"
    assert privacy["local"]["statement"].startswith("Silo 1") or "silo 1" in privacy["local"]["statement"].lower()
