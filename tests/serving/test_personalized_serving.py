"""fedrec recommend / fedrec.load serve a silo's personalized copy when the run kept one (--personalized/--global)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from typer.testing import CliRunner

from cli.main import app
from common.recency import RECENT_ITEMS_KEY, RECENT_WEIGHT_KEY
from common.rundir import RunDir
from common.storage import load_arrays, save_arrays
from fedrec import load
from serving.bundle import write_bundle
from serving.foldin import fold_in
from simulations.inprocess import InProcessGrid
from tests.serving.helpers import finished_run

runner = CliRunner()


@pytest.fixture(scope="module")
def personalized_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, InProcessGrid]:
    run = tmp_path_factory.mktemp("personalized") / "run"
    extra = {"personalize.enabled": True, "personalize.lr": 0.05, "personalize.epochs": 3}
    return run, finished_run(run, **extra)


def _store(run: Path, silo: int) -> Path:
    return run / "silos" / f"silo-{silo}" / RunDir(run).read_config().run_uid


def _arrays(path: Path) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in load_arrays(path).items()}


def _mf_scores(a: dict[str, np.ndarray], row: int) -> np.ndarray:
    """MF's score of user row ``row`` for every item, by hand from the arrays."""
    p, bu = a["user_embedding.weight"][row], a["user_bias.weight"][row]
    return p @ a["item_embedding.weight"].T + bu + a["item_bias.weight"][:, 0] + a["global_bias.value"]


def test_default_is_the_personalized_copy_and_global_is_final_npz_plus_the_rows(personalized_run):
    run, _ = personalized_run
    rec = load(run, user="u7")
    store = _store(run, rec.silo)
    copy = _arrays(store / "personalized.npz")
    final, rows = _arrays(run / "final.npz"), _arrays(store / "user-params.npz")
    row = rec.row_of("u7")
    # Default: the copy's arrays, every one of them.
    assert rec.served.personalized
    for name, table in {**rec.served.shared, **rec.served.users}.items():
        np.testing.assert_array_equal(table, copy[name])
    np.testing.assert_allclose(rec.score(["u7"], rec.served.item_ids)[0], _mf_scores(copy, row), rtol=1e-5, atol=1e-5)
    # personalized=False: the global model and the silo's rows.
    glob = load(run, user="u7", personalized=False)
    assert not glob.served.personalized
    np.testing.assert_allclose(
        glob.score(["u7"], glob.served.item_ids)[0], _mf_scores({**final, **rows}, row), rtol=1e-5, atol=1e-5
    )
    # A silo's state directory (deployment case) picks the copy as well.
    assert load(store).served.personalized and not load(store, personalized=False).served.personalized


def test_cli_flag_switches_the_model_and_the_copies_differ_from_the_global_model(personalized_run):
    run, _ = personalized_run
    final = _arrays(run / "final.npz")
    # Some silo's fine-tune moved the copy (lr 0.05, 3 epochs, selected on validation) ...
    moved = [
        silo
        for silo in range(3)
        if not np.array_equal(_arrays(_store(run, silo) / "personalized.npz")["item_bias.weight"], final["item_bias.weight"])
    ]
    assert moved
    user = next(u for u in load(run, silo=moved[0]).user_ids)
    answers = {}
    for flag in ("--personalized", "--global", None):
        args = ["recommend", str(run), "--user", user, "--json", "-k", "20"] + ([flag] if flag else [])
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        answers[flag] = json.loads(result.output)["items"]
    # ... so its users' scores differ between the two models; the default is the copy.
    assert answers[None] == answers["--personalized"] != answers["--global"]
    shown = runner.invoke(app, ["recommend", str(run), "--user", user])
    assert "personalized" in shown.output


def test_personalized_on_a_run_without_a_copy_is_a_clear_error(mf_run):
    run, _ = mf_run
    assert not load(run, user="u7").served.personalized  # default: the global model, silently
    result = runner.invoke(app, ["recommend", str(run), "--user", "u7", "--personalized"])
    assert result.exit_code == 2
    assert "personalized.npz not found" in result.output and "--global" in result.output


def test_export_states_which_model_the_bundle_holds(personalized_run, tmp_path):
    run, _ = personalized_run
    for flag, expected in (("--personalized", True), ("--global", False)):
        out = tmp_path / flag.strip("-")
        result = runner.invoke(app, ["export", str(run), "--silo", "0", "--out", str(out), flag])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "manifest.json").read_text())["personalized"] is expected
        assert load(out).served.personalized is expected
    # Asking a global bundle for the copy is refused, naming the flag.
    refused = runner.invoke(app, ["recommend", str(tmp_path / "global"), "--user", load(run, silo=0).user_ids[0], "--personalized"])
    assert refused.exit_code == 2 and "--personalized" in refused.output


def test_a_recency_copys_shift_moves_a_folded_in_user_too_and_survives_export(mf_run, tmp_path):
    run, _ = mf_run
    src = _store(run, 0)
    store = tmp_path / "store"
    shutil.copytree(src, store)
    final, rows = _arrays(run / "final.npz"), _arrays(src / "user-params.npz")
    m, weight = 2, 4.0
    # A recency copy as a silo keeps it: the global arrays, its users' rows, and (m, β) beside them.
    copy = {**final, **rows, RECENT_ITEMS_KEY: np.array([float(m)]), RECENT_WEIGHT_KEY: np.array([weight])}
    save_arrays(store / "personalized.npz", ArrayRecord({k: Array(v) for k, v in copy.items()}))
    rec = load(store, model=run / "final.npz")
    assert rec.served.personalized
    assert rec.served.train[RECENT_ITEMS_KEY] == m and rec.served.train[RECENT_WEIGHT_KEY] == weight
    history = list(rec.served.item_ids[[5, 9, 3]])  # in time order: 3 is the latest
    got = rec.recommend_new_user(history, k=10, include_seen=True)
    # By hand: the fold-in row plus β · mean of the unit rows of the last m items (9 and 3).
    folded = fold_in("mf", rec.served.shared, [np.array([5, 9, 3])], rec.served.train)
    q = final["item_embedding.weight"]
    unit = q[[9, 3]] / np.linalg.norm(q[[9, 3]], axis=1, keepdims=True)
    shifted = {**folded, "user_embedding.weight": folded["user_embedding.weight"] + weight * unit.mean(axis=0)}
    expected = _mf_scores({**final, **shifted}, 0)
    top = np.argsort(-expected, kind="stable")[:10]
    assert [e["item"] for e in got.items] == [str(rec.served.item_ids[i]) for i in top]
    np.testing.assert_allclose([e["score"] for e in got.items], expected[top], rtol=1e-4, atol=1e-4)
    # Without the shift the fold-in ranks differently; a bundle keeps (m, β) and serves the same.
    plain = load(run, silo=0, personalized=False).recommend_new_user(history, k=10, include_seen=True)
    assert [e["score"] for e in plain.items] != [e["score"] for e in got.items]
    write_bundle(rec.served, tmp_path / "bundle")
    again = load(tmp_path / "bundle").recommend_new_user(history, k=10, include_seen=True)
    assert again.items == got.items
    shown = runner.invoke(app, ["recommend", str(tmp_path / "bundle"), "--user", rec.user_ids[0]])
    assert shown.exit_code == 0, shown.output
    assert "personalized: rows shifted toward the last 2 items, β = 4" in " ".join(shown.output.split())  # unwrapped
