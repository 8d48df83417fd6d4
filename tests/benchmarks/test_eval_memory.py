"""The evaluation-memory benchmark runs every budget in a child and compares their sums."""

from benchmarks.eval_memory import main


def test_tiny_benchmark_prints_a_row_per_budget_with_equal_sums(capsys):
    rows = main(["--users", "30", "--items", "400", "--budgets", "64,0.01"])
    out = capsys.readouterr().out
    assert [r["budget"] for r in rows] == [64.0, 0.01]
    assert all(isinstance(r["peak_bytes"], int) and r["peak_bytes"] > 0 for r in rows)
    assert out.count("| yes |") == 2 and "metrics identical across budgets: True" in out
