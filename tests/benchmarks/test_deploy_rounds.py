"""benchmarks.deploy_rounds: the round-time arithmetic and the table (no deployment started)."""

import pytest

from benchmarks.deploy_rounds import Measurement, rows, table


def test_steady_rounds_leave_out_the_first_and_the_last_round():
    m = Measurement((12.0, 5.0, 4.0, 9.0), load=1.0)
    assert m.per_round == pytest.approx(6.0)  # (5 + 4 + 9) / 3
    assert m.steady == pytest.approx(4.5)  # (5 + 4) / 2


def test_the_fused_row_is_compared_with_the_one_exchange_floor():
    all_rows = rows(1)
    fused = next(r for r in all_rows if "eval.fused=true" in r.name)
    assert fused.run_config == {"eval.fused": True} and all_rows[fused.floor].run_config == {"exchanges": 1}
    results = {
        (3, fused.name): [Measurement((9.0, 6.0, 6.0, 8.0), 1.0), Measurement((9.0, 5.0, 5.0, 8.0), 2.0)],
        (3, all_rows[fused.floor].name): [Measurement((5.0, 4.0, 4.0, 4.0), 3.0)],
    }
    lines = table(results, [3], all_rows).splitlines()
    fused_line = next(line for line in lines if line.startswith(f"| {fused.name} "))
    # best 6.0 s/round (rounds 2..4), steady 5.0, 1/6 rounds/s, 6.0 / 4.0 = 1.50 × the floor row
    assert "| 3 | 6.0 | 5.0 | 0.167 | 1.50 (4) | 6.7, 6.0 | 1.0, 2.0 |" in fused_line
    floor_line = next(line for line in lines if line.startswith(f"| {all_rows[fused.floor].name} "))
    assert "| 4.0 | 4.0 | 0.250 | – |" in floor_line  # its own floor (row 3) was not run
