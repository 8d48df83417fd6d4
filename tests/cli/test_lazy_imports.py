"""`fedrec --help` and argument errors answer at once: no torch, no DP accountants, no Flower runtime."""

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "dp_accounting", "scipy", "opacus", "flwr", "pandas")

# Runs the command as the console script does, then reports which heavy modules it loaded.
_PROBE = """
import json, sys
from cli.main import app
try:
    app(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "loaded": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def _run(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["simulate", "--help"],
        ["centralized", "--help"],
        ["audit", "--help"],
        ["data", "prepare", "--help"],
        ["deploy", "local", "--help"],
        ["simulate", "--no-such-option"],
        ["deploy", "local", "--silos", "zero"],
    ],
)
def test_help_and_argument_errors_import_no_heavy_library(args: list[str]):
    # Act
    result = _run(*args)
    # Assert
    assert result["code"] in (0, 2)
    assert result["loaded"] == []


def test_fedrec_help_takes_well_under_a_second_of_cpu():
    # Arrange
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Act
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    # Assert
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 0, proc.stderr
    assert "simulate" in proc.stdout
    assert cpu < 1.0, f"fedrec --help took {cpu:.2f} s of CPU"
