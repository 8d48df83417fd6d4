"""``fedrec data``: turn an interaction log into one data directory per silo."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cli.output import console, fail
from common.config import AppConfig
from common.errors import ConfigError, DataError, FedrecError
from common.run_config import Scalar, load_default_run_config, merge_overrides

if TYPE_CHECKING:
    from common.data.prepare import PrepareSummary

data_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Prepare interaction data for deployment: one directory per silo.",
)

_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_RATING_FILES = {"u.data": "ml-100k", "ratings.dat": "ml-1m"}


@data_app.command()
def prepare(
    source: Annotated[
        Path,
        typer.Argument(
            help="MovieLens directory (or its ratings file), or a CSV/Parquet log.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Output directory; silo-0/, silo-1/, ... go in it."
        ),
    ],
    dataset: Annotated[
        str | None,
        typer.Option(
            help="ml-100k | ml-1m | csv | parquet (default: from the path: u.data "
            "or ratings.dat in it, or the file suffix)."
        ),
    ] = None,
    silos: Annotated[
        int | None,
        typer.Option(
            "--silos",
            min=1,
            help="Assign users to N silos by seed, exactly as simulation's "
            "'silos' partition does.",
        ),
    ] = None,
    silo_column: Annotated[
        str | None,
        typer.Option(
            "--silo-column",
            help="CSV/Parquet column naming each row's silo (e.g. platform); "
            "each user must have one value.",
        ),
    ] = None,
    user_col: Annotated[
        str | None, typer.Option(help="User ID column (default: data.user-col).")
    ] = None,
    item_col: Annotated[
        str | None, typer.Option(help="Item ID column (default: data.item-col).")
    ] = None,
    timestamp_col: Annotated[
        str | None,
        typer.Option(help="Timestamp column (default: data.timestamp-col)."),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Run seed: fixes the split and partition (default: the config's seed)."
        ),
    ] = None,
    eval_negatives: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Negatives per held-out item (default: data.eval-negatives)."
        ),
    ] = None,
    skew: Annotated[
        str | None,
        typer.Option(help="With --silos: iid | dirichlet (default: data.skew)."),
    ] = None,
    dirichlet_alpha: Annotated[
        float | None,
        typer.Option(help="With --skew dirichlet (default: data.dirichlet-alpha)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace the silo-<k>/ directories of an earlier prepare."
        ),
    ] = False,
) -> None:
    """Split a log into per-silo directories (train data, held-out items, catalogue).

    Held-out items and evaluation negatives equal simulation's for the same seed.

    Give each silo only its own directory, as its node config's data-path.
    """
    from common.data.prepare import prepare_silos

    try:
        if (silos is None) == (silo_column is None):
            raise ConfigError("give exactly one of --silos N and --silo-column COLUMN")
        if not source.exists():
            raise DataError(f"{source}: no such file or directory")
        named: dict[str, Scalar | None] = {
            "seed": seed,
            "data.eval-negatives": eval_negatives,
            "data.skew": skew,
            "data.dirichlet-alpha": dirichlet_alpha,
            "data.user-col": user_col,
            "data.item-col": item_col,
            "data.timestamp-col": timestamp_col,
        }
        cfg = AppConfig.from_run_config(
            merge_overrides(
                load_default_run_config(),
                {k: v for k, v in named.items() if v is not None},
            )
        )
        summary = prepare_silos(
            dataset or _infer_dataset(source),
            source,
            out,
            silo_column=silo_column,
            num_silos=silos,
            seed=cfg.seed,
            eval_negatives=cfg.data.eval_negatives,
            skew=cfg.data.skew,
            dirichlet_alpha=cfg.data.dirichlet_alpha,
            user_col=cfg.data.user_col,
            item_col=cfg.data.item_col,
            timestamp_col=cfg.data.timestamp_col,
            force=force,
        )
    except (FedrecError, OSError) as e:
        fail(e, 2 if isinstance(e, ConfigError) else 1)  # 2 for usage, 1 for data
    _print_summary(summary)


def _infer_dataset(path: Path) -> str:
    """Tell the data set from the path, or ask for --dataset."""
    if path.is_dir():
        for name, dataset in _RATING_FILES.items():
            if (path / name).is_file():
                return dataset
        raise ConfigError(
            f"{path}: cannot tell the data set: no u.data (ml-100k) or ratings.dat "
            "(ml-1m) in it; pass --dataset"
        )
    found = _RATING_FILES.get(path.name) or _SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise ConfigError(
            f"{path}: cannot tell the data set from the file name; pass --dataset "
            "(ml-100k | ml-1m | csv | parquet)"
        )
    return found


def _print_summary(summary: PrepareSummary) -> None:
    """Print what was read, how it was split, and one row per silo."""
    from common.data.prepared import DATA_FILES, MANIFEST

    s = summary
    console.print(
        f"[bold]fedrec data prepare[/]: {s.source} ({s.dataset}, sha256 "
        f"{s.source_sha256[:12]}…): {s.num_interactions} interactions, "
        f"{s.num_users} users, {s.num_items} items"
    )
    console.print(
        f"split: leave-one-out by time, seed {s.seed}, {s.eval_negatives} evaluation "
        f"negatives per held-out item; users: {s.assignment}"
    )
    named = any(silo.name is not None for silo in s.silos)
    table = Table(title=f"silo directories in {s.out_dir}")
    table.add_column("silo", justify="right")
    if named:
        table.add_column("name")
    for column in ("users", "train interactions", "val/test users"):
        table.add_column(column, justify="right")
    table.add_column("files", no_wrap=True)
    for silo in s.silos:
        cells = [str(silo.silo_id), *([silo.name or ""] if named else [])]
        cells += [str(silo.num_users), str(silo.num_train), str(silo.num_heldout)]
        table.add_row(*cells, f"{silo.path.name}/ ({len(silo.files)} files)")
    table.add_section()
    table.add_row(
        "total",
        *([""] if named else []),
        str(sum(x.num_users for x in s.silos)),
        str(sum(x.num_train for x in s.silos)),
        str(sum(x.num_heldout for x in s.silos)),
        "",
    )
    console.print(table)
    console.print(
        f"each silo-<k>/ holds {', '.join(DATA_FILES)} and {MANIFEST} "
        "(format: docs/data-format.md)"
    )
    n = len(s.silos)
    console.print(
        f"deploy: give silo k only its directory, e.g. --node-config "
        f"'partition-id=0 num-partitions={n} data-path=\"{s.out_dir / 'silo-0'}\"'"
    )
