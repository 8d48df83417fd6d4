"""The DP-step benchmark runs every method end to end and prints a complete table."""

import re

from benchmarks.dp_step import METHODS, main


def test_tiny_benchmark_prints_a_timed_row_for_every_method(capsys):
    # Act: tiny sizes, cells in-process (a subprocess per cell would re-import torch six times)
    rows = main(["--models", "mf", "--items", "500", "--dim", "8", "--batch", "32", "--steps", "2",
                 "--in-process", "--markdown"])
    out = capsys.readouterr().out
    # Assert: one markdown row per method with numeric ms and ratio, then the targets
    table = {cells[2]: cells for cells in (line.strip("| ").split(" | ") for line in out.splitlines()
                                           if line.startswith("| mf |"))}
    assert set(table) == set(METHODS)
    for method, cells in table.items():
        assert float(cells[3]) > 0 and float(cells[4]) > 0, method  # median and min ms
        assert re.fullmatch(r"\d+\.\d\d×( \(best\))?", cells[5]), cells
    assert [r.result["status"] for r in rows] == ["ok"] * len(METHODS)
    assert "MF @ 500 items: fedrec" in out and "target ≤ 1.3×" in out


def test_interleaved_run_times_every_method_in_one_process(capsys):
    rows = main(["--models", "mf", "--items", "300", "--dim", "4", "--batch", "16", "--steps", "2",
                 "--methods", "plain-sparse,fedrec", "--interleave", "--markdown"])
    out = capsys.readouterr().out
    assert [r.cell.method for r in rows] == ["plain-sparse", "fedrec"]
    assert all(r.result["status"] == "ok" and r.result["steps"] == 2 and r.result["extra_mib"] is None for r in rows)
    assert "| mf | 300 | fedrec |" in out and "MF @ 300 items: fedrec" in out


def test_fedrec_is_also_compared_with_the_closed_form_non_private_step(capsys):
    rows = main(["--models", "mf", "--items", "300", "--dim", "4", "--batch", "16", "--steps", "2",
                 "--methods", "plain-sparse,plain-sparse-closed-form,fedrec", "--interleave", "--markdown"])
    out = capsys.readouterr().out
    assert all(r.result["status"] == "ok" for r in rows)
    # the closed-form step is never the "best non-private" baseline the targets use
    assert "(best)" not in next(line for line in out.splitlines() if "| plain-sparse-closed-form |" in line)
    assert re.search(r"MF @ 300 items: fedrec = \d+\.\d\d× plain-sparse-closed-form", out)
