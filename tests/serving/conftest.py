"""The serving tests' shared run: a tiny finished simulation, run once per module."""

from pathlib import Path

import pytest

from simulations.inprocess import InProcessGrid
from tests.serving.helpers import finished_run


@pytest.fixture(scope="module")
def mf_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, InProcessGrid]:
    run = tmp_path_factory.mktemp("serving") / "run"
    return run, finished_run(run)
