"""Fixtures for the prepared-silo tests: a CSV log and one prepare of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.common.prepared_inputs import prepare_csv, write_log_csv


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic log as CSV, with a platform per user and two short users."""
    return write_log_csv(tmp_path_factory.mktemp("log") / "log.csv")


@pytest.fixture(scope="module")
def prepared(log_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log prepared once into 4 silos by seed."""
    out = tmp_path_factory.mktemp("prepared")
    prepare_csv(log_csv, out)
    return out
