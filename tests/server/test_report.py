"""report.md and its plots, from hand-written round records, ledgers and config."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from matplotlib.ticker import MaxNLocator

from common import records
from common.privacy.events import PrivacyRelease
from common.privacy.ledger import Chain
from common.privacy.statement import silo_sentence
from common.round_record import RoundRecord
from common.rundir import RunDir
from server.plots import privacy_figure, rounds_figure
from server.report import render_privacy, render_report, silo_epsilons
from tests.fakes import dp_sgd_release

K = 10


def _release(owner: str, round_: int, epsilon: float, **changes) -> PrivacyRelease:
    return dp_sgd_release(owner, round_, epsilon, **changes)


def _round(n: int, *, train=None, evaluate=None, privacy=(), central=None) -> RoundRecord:
    return RoundRecord(
        server_round=n,
        seconds=1.5 * n,
        train={} if train is None else train,
        evaluate={} if evaluate is None else evaluate,
        bytes_sent=1000 * n,
        bytes_received=2000 * n,
        missing_nodes=(),
        rejected=(),
        privacy=tuple(privacy),
        central=central,
    )


def _metrics(hr: float) -> dict[str, float]:
    return {f"val-hr@{K}": hr, f"test-hr@{K}": hr - 0.01, f"test-ndcg@{K}": hr / 2}


def _write_run(path: Path, config: dict, ledgers: dict[str, list[PrivacyRelease]]) -> RunDir:
    run = RunDir(path)
    path.mkdir(parents=True, exist_ok=True)
    run.config.write_text(json.dumps({"run-config": config, "run-uid": "0123abcd", "versions": {}}))
    run.ledger_dir.mkdir()
    for owner, rels in ledgers.items():
        chain = Chain(owner)
        for rel in rels:
            chain.append_release(rel)
        target = run.server_ledger if owner == "server" else run.silo_ledger(int(owner.split("-")[1]))
        target.write_text("".join(f"{line}\n" for line in chain.lines))
    return run


LOCAL_CONFIG = {
    "data.dataset": "ml-100k",
    "model.name": "mf",
    "model.dim": 16,
    "seed": 42,
    "num-server-rounds": 3,
    "privacy.mode": "local",
    "privacy.release.evaluation": "withheld",
    "privacy.noise-generator": "csprng",
}


def test_a_local_dp_report_names_the_run_and_opens_with_one_sentence_per_silo_from_its_ledger(tmp_path):
    # Ledgers hold 3 rounds per silo; metrics.jsonl (the rounds) hold only 2: the statement follows the ledgers.
    ledgers = {f"silo-{k}": [_release(f"silo-{k}", r, 0.5 * r) for r in (1, 2, 3)] for k in (1, 0)}
    run = _write_run(tmp_path / "run", LOCAL_CONFIG, ledgers)
    rounds = [_round(r, privacy=[ledgers["silo-0"][r - 1], ledgers["silo-1"][r - 1]]) for r in (1, 2)]
    text = render_report(rounds, K, "metrics.png", run_dir=run)
    lines = text.splitlines()
    assert lines[2] == (
        "**Run:** data set `ml-100k` · model `mf, d = 16` · 2 silos · seed 42 · privacy mode `local` · "
        "3 rounds planned · run uid `0123abcd`."
    )
    assert lines[4] == "## Privacy statement"
    assert lines[6] == "- " + silo_sentence(ledgers["silo-0"])
    assert lines[7] == "- " + silo_sentence(ledgers["silo-1"])
    assert "(ε = 1.50, δ = 1e-5)" in lines[6] and "covering 3 rounds of DP-SGD" in lines[6]
    # Nothing lists un-noised side outputs as exceptions: they are withheld.
    assert "Not covered" not in text and "not differentially private" not in text
    assert "**Evaluation withheld:**" in text
    assert "| 1 | withheld |" in text  # the round table's train loss
    assert "| 2 | 3.00 | withheld | withheld | 2,000 | 4,000 |" in text  # training seconds, CPU seconds


def test_a_report_without_dp_says_so_and_shows_reported_training_seconds():
    train = {records.TRAIN_LOSS: 0.25, records.TRAIN_SECONDS: 4.2, records.TRAIN_CPU_SECONDS: 3.9, records.TRAIN_SILOS: 3}
    rounds = [_round(r, train=train, evaluate=_metrics(0.3 + 0.1 * r)) for r in (1, 2)]
    text = render_report(rounds, K, "metrics.png")
    assert "3 silos" in text and "privacy mode `none` (read off the rounds: no config.json)" in text
    assert "- No differential privacy (`privacy.mode = none`)" in text
    assert "| 1 | 1.50 | 4.20 | 3.90 | 1,000 | 2,000 |" in text
    assert "| 2 | 0.2500 |" in text
    assert "not differentially private" in text
    assert "fedrec centralized --model popularity" in text  # no popularity sums in a federated evaluation


def test_the_popularity_baseline_stands_beside_the_model_when_the_evaluation_has_it():
    evaluate = {**_metrics(0.5), f"popularity-test-hr@{K}": 0.41, f"popularity-test-ndcg@{K}": 0.22}
    text = render_report([_round(1, evaluate=evaluate)], K, "metrics.png")
    assert f"| popularity test HR@{K} | popularity test NDCG@{K} |" in text
    assert "| final round | 1 | 0.4900 | 0.2500 | 0.5000 | 0.4100 | 0.2200 |" in text
    assert "fedrec centralized --model popularity" not in text


def _central(r: int, eps: float) -> PrivacyRelease:
    return _release(
        "server", r, eps, kind="dp-fedavg", unit="client", population=4, delta=0.025, steps=1, total_steps=r,
        released="shared model parameters after the round", expected_batch_size=None,
    )


def test_central_dp_report_states_the_server_and_withholds_its_counts(tmp_path):
    central = [_central(r, 0.4 * r) for r in (1, 2)]
    run = _write_run(tmp_path / "run", {**LOCAL_CONFIG, "privacy.mode": "central"}, {"server": central})
    rounds = [_round(r, central=central[r - 1]) for r in (1, 2)]
    text = render_report(rounds, K, "metrics.png", run_dir=run)
    statement = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(statement) == 1 and statement[0].startswith("- server: client-level (ε = 0.800, δ = 0.025)")
    assert "trusted with it" in statement[0]
    assert "4 silos" in text.splitlines()[2]  # no silo ledger: the central roster
    privacy = render_privacy(rounds, "central", "privacy.png", run_dir=run)
    assert "Unit of privacy: **one silo**" in privacy and "N = 4 silos (public roster)" in privacy
    assert "| 2 | 0.8000 |" in privacy and "is withheld" in privacy


def test_silo_epsilons_take_one_point_per_round_the_largest_epsilon():
    sgd = _release("silo-0", 1, 0.5)
    later = replace(sgd, epsilon=0.55, released="another release of the same round")
    assert silo_epsilons([_round(1, privacy=[sgd, later])]) == {0: [(1, 0.55, True)]}


def test_privacy_plot_labels_the_real_unit_draws_the_budget_and_uses_integer_rounds():
    rounds = [_round(r, privacy=[_release("silo-0", r, 0.5 * r, unit="interaction")],
                     central=_central(r, 0.3 * r)) for r in (1, 2, 3)]
    fig = privacy_figure(rounds)
    (ax,) = fig.axes
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels[0] == "silo 0: interaction-level, δ = 1e-5"
    assert labels[1] == "server: client-level (one silo), δ = 0.025"
    assert "silo and server budget ε = 8" in labels
    budget = next(line for line in ax.get_lines() if line.get_label() == "silo and server budget ε = 8")
    assert list(budget.get_ydata()) == [8.0, 8.0]
    locator = ax.xaxis.get_major_locator()
    assert isinstance(locator, MaxNLocator) and locator._integer  # noqa: SLF001
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_rounds_plot_uses_integer_rounds_and_says_when_the_loss_is_withheld():
    fig = rounds_figure([_round(r, evaluate=_metrics(0.4)) for r in (1, 2, 3)], K)
    left, right = fig.axes
    for ax in (left, right):
        assert all(float(t).is_integer() for t in ax.get_xticks())
    assert "withheld" in right.get_title()
    assert not math.isnan(left.get_lines()[0].get_ydata()[0])


@pytest.mark.parametrize("with_loss", [True, False])
def test_rounds_plot_draws_the_loss_only_when_it_was_sent(with_loss):
    train = {records.TRAIN_LOSS: 0.3} if with_loss else {}
    fig = rounds_figure([_round(r, train=train, evaluate=_metrics(0.4)) for r in (1, 2)], K)
    assert len(fig.axes[1].get_lines()) == (1 if with_loss else 0)
