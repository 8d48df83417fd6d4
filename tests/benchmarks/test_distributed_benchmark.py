"""benchmarks.distributed: the DP popularity baseline and the table (the federated points run in tests/server)."""

import math

import pytest

from benchmarks.distributed import dp_popularity, print_table
from common.privacy.accounting import epsilon
from common.privacy.events import MechanismUse
from common.run_config import load_default_run_config


def _base():
    return {**load_default_run_config(), "data.synthetic.num-users": 400, "data.synthetic.num-items": 200}


def test_dp_popularity_spends_all_of_epsilon_on_one_gaussian_and_tends_to_the_exact_ranking():
    exact = dp_popularity(_base(), math.inf, 5, 1, 0)
    assert exact["noise-multiplier"] == 0.0
    private = dp_popularity(_base(), 1.0, 5, 1, 0)
    assert private["delta"] == 1e-5  # min(1e-5, 1/(10·400))
    assert epsilon([MechanismUse(private["noise-multiplier"], 1.0, 1)], private["delta"]) == pytest.approx(1.0, abs=0.01)
    loose = dp_popularity(_base(), 8.0, 5, 1, 0)  # σ_h ≈ 0.6 on counts of tens: about the exact ranking
    assert loose["test-hr@10"] == pytest.approx(exact["test-hr@10"], abs=0.03)


def test_table_prints_every_row(capsys):
    rows = [
        {"mode": "popularity", "target-epsilon": math.inf, "val-hr@10": 0.4, "test-hr@10": 0.41},
        {"mode": "distributed", "target-epsilon": 8.0, "val-hr@10": 0.5, "test-hr@10": 0.48, "delta": 1e-5,
         "noise-multiplier": 1.2, "sample-rate": 1.0, "round": 3},
    ]
    print_table(rows, "t")
    out = capsys.readouterr().out
    assert "| distributed | 8 | 1.0e-05 | 1.200 | 1.000 | 3 | 0.5000 | 0.4800 |" in out
    assert "| popularity | ∞ |" in out


def test_table_puts_the_recency_copy_beside_the_non_private_runs_own_copy(capsys):
    rows = [
        {"mode": "reference-none", "target-epsilon": math.inf, "val-hr@10": 0.69, "test-hr@10": 0.64,
         "personalized-test-hr@10": 0.70},
        {"mode": "distributed", "target-epsilon": 8.0, "val-hr@10": 0.5, "test-hr@10": 0.48, "delta": 1e-5,
         "noise-multiplier": 1.2, "sample-rate": 1.0, "round": 3, "personalized-test-hr@10": 0.56},
    ]
    print_table(rows, "t")
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].endswith("% of non-private's recency copy |") and lines[3].count("|") == 13
    # 0.48 / 0.64 = 75.0% of the plain model; 0.56 / 0.70 = 80.0% of the same head without DP
    assert lines[5].endswith("| 75.0% | - | 0.5600 | 80.0% |")
    assert lines[4].endswith("| 0.7000 | 100.0% |")
