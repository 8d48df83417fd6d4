"""fedrec recommend / export on a tiny finished simulation: ids, exclusions, errors, bundle, durable rows."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from cli.main import app
from common import records
from common.config import AppConfig
from common.data.pipeline import load_interactions, partition, split_interactions
from common.rundir import RunDir
from common.storage import load_arrays
from fedrec import load

runner = CliRunner()


def _known_items(run: Path, user: str) -> tuple[int, set[str], set[str]]:
    """The silo of raw ``user``, their raw training items and their held-out ones, re-derived from the data."""
    cfg = AppConfig.from_run_config(RunDir(run).read_config().run_config)
    interactions = load_interactions(cfg.data, cfg.seed)
    pooled = split_interactions(cfg.data, cfg.seed, interactions)
    parts = partition(cfg.data, cfg.seed, pooled, interactions, 3)
    index = int(np.flatnonzero(interactions.user_ids == user)[0])
    silo = next(k for k, users in enumerate(parts) if index in users)
    split = pooled.split
    items = split.train_item[split.train_user == index]
    held = [split.val_item[index], split.test_item[index]]
    return silo, {str(interactions.item_ids[i]) for i in items}, {str(interactions.item_ids[i]) for i in held if i >= 0}


def _training_items(run: Path, user: str) -> tuple[int, set[str]]:
    silo, train, held = _known_items(run, user)
    return silo, train | held


def test_every_silos_rows_are_on_disk_after_a_run_without_state_root_and_equal_the_nodes_rows(mf_run):
    run, grid = mf_run
    uid = RunDir(run).read_config().run_uid
    for node, context in grid.contexts.items():
        store = run / "silos" / f"silo-{node - 1}" / uid
        on_disk = load_arrays(store / "user-params.npz")
        in_memory = context.state.array_records[records.STATE_USER_PARAMS]
        assert sorted(on_disk) == ["user_bias.weight", "user_embedding.weight"]
        for name in on_disk:
            np.testing.assert_array_equal(on_disk[name].numpy(), in_memory[name].numpy())
        info = json.loads((store / "silo.json").read_text())
        assert (info["partition-id"], info["num-partitions"]) == (node - 1, 3)


def test_recommend_prints_ten_distinct_raw_ids_none_a_training_item_and_json_is_one_object(mf_run):
    run, _ = mf_run
    silo, seen = _training_items(run, "u7")
    result = runner.invoke(app, ["recommend", str(run), "--user", "u7", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["user"] == "u7"
    items = [e["item"] for e in answer["items"]]
    assert len(items) == 10 == len(set(items))
    assert all(i.startswith("i") for i in items) and not set(items) & seen
    scores = [e["score"] for e in answer["items"]]
    assert scores == sorted(scores, reverse=True)
    # --include-seen ranks over the whole catalogue: the top score can only grow.
    everything = json.loads(runner.invoke(app, ["recommend", str(run), "--user", "u7", "--json", "--include-seen"]).output)
    assert everything["items"][0]["score"] >= answer["items"][0]["score"]
    assert load(run, user="u7").silo == silo


def test_a_users_held_out_items_are_left_out_like_the_training_ones(mf_run):
    # the held-out items are the user's two latest interactions: serving must not recommend them back
    run, _ = mf_run
    _, train, held = _known_items(run, "u7")
    assert len(held) == 2 and not held & train
    rec = load(run, user="u7")
    num_items = len(rec.served.item_ids)
    every = {e["item"] for e in rec.recommend("u7", k=num_items, include_seen=True)[0].items}
    assert held <= every  # ranked when seen items are included: the check below can fail
    rest = [e["item"] for e in rec.recommend("u7", k=num_items - len(train) - len(held))[0].items]
    assert len(rest) == num_items - len(train) - len(held) and not set(rest) & (train | held)


def test_batch_writes_one_row_per_user_and_rank_in_csv_and_parquet(mf_run, tmp_path):
    run, _ = mf_run
    rec = load(run, silo=1)
    users = tmp_path / "users.txt"
    users.write_text("\n".join(rec.user_ids[:4]) + "\n")
    for suffix in ("csv", "parquet"):
        out = tmp_path / f"top.{suffix}"
        result = runner.invoke(app, ["recommend", str(run), "--users", str(users), "--out", str(out), "-k", "3"])
        assert result.exit_code == 0, result.output
        frame = pd.read_csv(out) if suffix == "csv" else pd.read_parquet(out)
        assert len(frame) == 12
        assert list(frame["user"].astype(str)) == [u for u in rec.user_ids[:4] for _ in range(3)]
        assert list(frame["rank"]) == [1, 2, 3] * 4


def test_unknown_user_item_and_missing_path_are_one_clear_error_exit_2(mf_run, tmp_path):
    run, _ = mf_run
    cases = [
        (["--user", "nobody"], "user 'nobody' is not in the data of the run"),
        (["--user", "u7", "--silo", "2" if load(run, user="u7").silo != 2 else "0"], "is not a user of silo"),
        (["--history", "i1,no-such-item"], "item 'no-such-item' is not in the catalogue"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["recommend", str(run), *(["--silo", "0"] if "--history" in args else []), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    missing = runner.invoke(app, ["recommend", str(tmp_path / "nothing"), "--user", "u1"])
    assert missing.exit_code == 2 and f"{tmp_path / 'nothing'} does not exist" in missing.output
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((run / "config.json").read_text())
    result = runner.invoke(app, ["recommend", str(unfinished), "--user", "u1"])
    assert result.exit_code == 2 and "final.npz not found" in result.output


def test_history_folds_in_a_new_user_and_leaves_their_items_out(mf_run):
    run, _ = mf_run
    history = ["i1", "i2", "i3"]
    result = runner.invoke(app, ["recommend", str(run), "--silo", "0", "--history", ",".join(history), "--json"])
    assert result.exit_code == 0, result.output
    items = [e["item"] for e in json.loads(result.output)["items"]]
    assert len(items) == 10 and not set(items) & set(history)


def test_a_silos_state_directory_plus_the_final_model_serves_like_the_run_directory(mf_run):
    run, _ = mf_run
    rec = load(run, user="u7")
    store = next((run / "silos" / f"silo-{rec.silo}").iterdir())
    by_state = load(store, model=run / "final.npz")
    assert by_state.user_ids == rec.user_ids
    assert by_state.recommend(["u7"], 10)[0].items == rec.recommend(["u7"], 10)[0].items
    # The model is found in the enclosing run directory when not given.
    assert load(store).recommend(["u7"], 3)[0].items == rec.recommend(["u7"], 3)[0].items


SCRIPT = textwrap.dedent(
    """
    import json, sys, numpy as np
    from safetensors.numpy import load_file
    d = sys.argv[1]; s = load_file(f"{d}/shared.safetensors"); u = load_file(f"{d}/users.safetensors")
    seen = load_file(f"{d}/seen.safetensors"); users = json.load(open(f"{d}/users.json"))["ids"]
    items = json.load(open(f"{d}/items.json"))["ids"]; r = users.index(sys.argv[2])
    p, bu = u["user_embedding.weight"][[r]], u["user_bias.weight"][[r]]
    score = ((p @ s["item_embedding.weight"].T + bu) + s["item_bias.weight"].T + s["global_bias.value"])[0]
    score[seen["items"][seen["indptr"][r]:seen["indptr"][r + 1]]] = -np.inf
    top = np.lexsort((np.arange(len(score)), -score.astype(np.float64)))[:10]
    print(json.dumps([[items[i], float(score[i])] for i in top]))
    """
)


def test_a_ten_line_safetensors_numpy_script_reproduces_recommend_exactly_from_the_bundle(mf_run, tmp_path):
    run, _ = mf_run
    bundle = tmp_path / "bundle"
    result = runner.invoke(app, ["export", str(run), "--silo", "1", "--out", str(bundle)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"] == {"kind": "mf", "num-items": 300, "dim": 8, "num-users": len(load(run, silo=1).user_ids)}
    assert manifest["privacy"]["mode"] == "none" and "No differential privacy" in manifest["privacy"]["statement"]
    assert len(manifest["data-fingerprint"]["sha256"]) == 64 and "item_embedding.weight" in manifest["score"]
    user = load(run, silo=1).user_ids[3]
    script = tmp_path / "serve.py"
    script.write_text(SCRIPT)
    assert len(SCRIPT.strip().splitlines()) == 10
    out = subprocess.run([sys.executable, str(script), str(bundle), user], capture_output=True, text=True, check=True)
    by_script = [tuple(x) for x in json.loads(out.stdout)]
    for source in (run, bundle):
        args = ["recommend", str(source), "--user", user, "--json", *(["--silo", "1"] if source == run else [])]
        served = json.loads(runner.invoke(app, args).output)
        assert [(e["item"], e["score"]) for e in served["items"]] == by_script
    # A bundle is refused when it is incomplete, and --out never overwrites.
    again = runner.invoke(app, ["export", str(run), "--silo", "1", "--out", str(bundle)])
    assert again.exit_code == 2 and "is not an empty directory" in again.output
    (bundle / "seen.safetensors").unlink()
    broken = runner.invoke(app, ["recommend", str(bundle), "--user", user])
    assert broken.exit_code == 2 and "seen.safetensors not found" in broken.output
