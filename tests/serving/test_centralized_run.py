"""fedrec centralized writes a simulation-shaped run directory that fedrec recommend serves."""

import json

from typer.testing import CliRunner

from cli.main import app
from common.rundir import RunDir
from fedrec import load

runner = CliRunner()


def test_centralized_writes_the_run_directory_of_a_simulation_honours_eval_every_and_serves(tmp_path):
    run = tmp_path / "c"
    result = runner.invoke(
        app,
        ["centralized", "-c", "data.synthetic.num-users=200", "-c", "data.synthetic.num-items=300",
         "-c", "model.dim=8", "-c", "eval.every=2", "-c", "eval.full-ranking=false", "--epochs", "3",
         "--run-dir", str(run)],
    )
    assert result.exit_code == 0, result.output
    rd = RunDir(run)
    for path in (rd.config, rd.metrics, rd.final_model, rd.report, rd.metrics_plot, rd.summary):
        assert path.is_file(), path
    rounds = rd.read_rounds()
    assert [r.server_round for r in rounds] == [1, 2, 3]
    assert [bool(r.evaluate) for r in rounds] == [False, True, True]  # every 2nd epoch and the last
    assert all("train-loss" in r.train for r in rounds)
    assert rd.read_config().run_config["eval.every"] == 2
    summary = json.loads(rd.summary.read_text())
    assert summary["best-epoch"] in (2, 3)
    assert "# fedrec run report" in rd.report.read_text()
    # Every user is served from the one pooled silo.
    rec = load(run, user="u3")
    assert rec.silo == 0 and len(rec.user_ids) == 200
    answer = runner.invoke(app, ["recommend", str(run), "--user", "u3", "--json", "-k", "5"])
    assert answer.exit_code == 0, answer.output
    items = json.loads(answer.output)["items"]
    assert len({e["item"] for e in items}) == 5
