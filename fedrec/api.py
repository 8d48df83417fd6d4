"""``fedrec.simulate``, ``fedrec.centralized``, ``fedrec.load``: the CLI's code paths, as functions.

``simulate(runtime="flower")`` is ``fedrec simulate`` (a private SuperLink and ``flwr run``
on Ray, :mod:`cli.simulate`); ``runtime="inprocess"`` runs the same ServerApp and
ClientApp code over fedrec's in-process grid (:mod:`simulations.inprocess`), with no
Ray. Both return when the run ends. Errors are :class:`common.errors.FedrecError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.errors import ConfigError, FedrecError
from common.round_record import RoundRecord
from common.run_config import Scalar, load_default_run_config, merge_overrides
from common.rundir import RunDir, default_run_dir
from serving.silo import Recommender


@dataclass(frozen=True)
class Run:
    """A finished run directory: its config, its rounds (epochs for a centralized run), its files."""

    path: Path

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.path)

    @property
    def run_config(self) -> dict[str, Any]:
        return self.run_dir.read_config().run_config

    @property
    def rounds(self) -> list[RoundRecord]:
        return self.run_dir.read_rounds()

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """One dict per round: ``round``, training metrics (``train-loss``...), evaluation metrics."""
        return [{"round": r.server_round, **r.train, **r.evaluate} for r in self.rounds]

    @property
    def final_model(self) -> Path:
        return self.run_dir.final_model

    @property
    def report(self) -> Path:
        return self.run_dir.report

    def load(
        self, silo: int | None = None, *, user: object | None = None, personalized: bool | None = None
    ) -> Recommender:
        """The recommender of one silo of this run (see :func:`load`)."""
        return load(self.path, silo=silo, user=user, personalized=personalized)


def simulate(
    overrides: Mapping[str, Scalar] | None = None,
    *,
    runtime: Literal["flower", "inprocess"] = "flower",
    run_dir: str | Path | None = None,
    silos: int | None = None,
) -> Run:
    """Run a federated simulation with ``overrides`` on the defaults (``{"train.lr": 0.01}``).

    ``silos``: number of clients (default 5; ``data.partition = "by-user"``: one per user).
    """
    values = dict(overrides or {})
    if runtime == "flower":
        return _flower(values, run_dir, silos)
    if runtime != "inprocess":
        raise ConfigError(f"runtime must be 'flower' or 'inprocess', got {runtime!r}")
    from cli.config import preflight
    from common.config import AppConfig
    from simulations.inprocess import run_inprocess

    defaults = load_default_run_config()
    given = {**defaults, **values}
    run = RunDir(Path(run_dir or default_run_dir(str(given["data.dataset"]))).expanduser().resolve())
    if run.holds_run():
        raise ConfigError(f"{run.path} already holds a run; choose another run_dir")
    values["run-dir"] = str(run.path)
    if not given["state-root"]:
        values["state-root"] = str(run.silo_states)
    if isinstance(values.get("data.path"), str) and values["data.path"]:
        values["data.path"] = str(Path(str(values["data.path"])).expanduser().resolve())
    run_config = merge_overrides(defaults, values)
    num_clients = preflight(AppConfig.from_run_config(run_config), silos)
    with run.locked():
        run_inprocess(run_config, num_clients)
    return Run(run.path)


def centralized(
    overrides: Mapping[str, Scalar] | None = None,
    *,
    run_dir: str | Path | None = None,
    epochs: int | None = None,
    model: str | None = None,
) -> Run:
    """Train the same model on the pooled data (``fedrec centralized``); ``model`` may be ``"popularity"``."""
    from common.config import AppConfig
    from simulations.centralized_run import run_centralized_dir

    values = dict(overrides or {})
    if model is not None and model != "popularity":
        values["model.name"] = model
    if isinstance(values.get("data.path"), str) and values["data.path"]:
        values["data.path"] = str(Path(str(values["data.path"])).expanduser().resolve())
    run_config = merge_overrides(load_default_run_config(), values)
    cfg = AppConfig.from_run_config(run_config)
    run = RunDir(Path(run_dir or default_run_dir(f"centralized-{cfg.data.dataset}")).expanduser().resolve())
    if run.holds_run():
        raise ConfigError(f"{run.path} already holds a run; choose another run_dir")
    n_epochs = epochs if epochs is not None else cfg.num_server_rounds * cfg.train.local_epochs
    with run.locked():
        run_centralized_dir(run, run_config, cfg, n_epochs, model_name=model)
    return Run(run.path)


def load(
    path: str | Path,
    silo: int | None = None,
    *,
    model: str | Path | None = None,
    user: object | None = None,
    personalized: bool | None = None,
) -> Recommender:
    """The recommender of one silo: from a run directory, a silo's state directory (+ ``model``) or a bundle.

    In a run directory ``silo`` defaults to the silo of ``user`` (or the only silo).
    ``personalized``: the silo's personalized copy (``personalize.enabled``; ``True``
    fails without one), the global model (``False``), or the copy when the silo kept
    one (``None``).
    """
    from serving.sources import open_source

    return Recommender(
        open_source(
            Path(path), silo=silo, model=Path(model) if model else None, user=user, personalized=personalized
        )
    )


def _flower(values: dict[str, Scalar], run_dir: str | Path | None, silos: int | None) -> Run:
    import typer

    from cli.simulate import simulate as simulate_command

    run = Path(run_dir or default_run_dir(str({**load_default_run_config(), **values}["data.dataset"]))).resolve()
    try:
        simulate_command(config=[f"{k}={_toml(v)}" for k, v in values.items()], run_dir=run, silos=silos)
    except typer.Exit as exc:
        if exc.exit_code:
            raise FedrecError(
                f"fedrec simulate failed (exit code {exc.exit_code}); see {RunDir(run).flower_log}"
            ) from None
    return Run(run)


def _toml(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)
