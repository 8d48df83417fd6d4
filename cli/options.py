"""Option types the ``fedrec`` commands share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--config", "-c", help="Override: -c train.lr=0.005, or a TOML file of overrides (repeatable)."
    ),
]
DatasetOpt = Annotated[
    str | None, typer.Option(help="synthetic | ml-100k | ml-1m | csv | parquet (data.dataset).")
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="MovieLens directory or CSV/Parquet file (data.path).")
]
ModelOpt = Annotated[str | None, typer.Option(help="mf | neumf (model.name).")]
RunDirOpt = Annotated[Path | None, typer.Option(help="Where to write the run (default runs/<time>-<dataset>).")]
RoundsOpt = Annotated[int | None, typer.Option(min=1, help="num-server-rounds.")]
