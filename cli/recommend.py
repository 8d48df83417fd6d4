"""``fedrec recommend`` and ``fedrec export``: a finished run's top-K for one silo's users, and its bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.output import console, fail, fmt, os_errors
from common.recency import RECENT_ITEMS_KEY, RECENT_WEIGHT_KEY

PathArg = Annotated[
    Path,
    typer.Argument(help="A run directory (simulate, deploy local, centralized), a silo state directory or a bundle."),
]
SiloOpt = Annotated[int | None, typer.Option(min=0, help="The silo (default: the silo of --user).")]
ModelPathOpt = Annotated[
    Path | None, typer.Option("--model", help="The final shared model (final.npz) for a silo's state directory.")
]
PersonalizedOpt = Annotated[
    bool | None,
    typer.Option(
        "--personalized/--global",
        help="The silo's personalized copy (personalize.enabled) or the global model "
        "(default: the copy when the silo kept one).",
    ),
]


def recommend(
    path: PathArg,
    user: Annotated[str | None, typer.Option("--user", help="Raw user id (as in the input data).")] = None,
    users: Annotated[Path | None, typer.Option("--users", help="File of raw user ids, one a line (batch).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Batch output: FILE.parquet or FILE.csv.")] = None,
    history: Annotated[
        str | None,
        typer.Option("--history", help="Comma-separated raw item ids of a user the model never saw (fold-in)."),
    ] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Items per user.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    include_seen: Annotated[bool, typer.Option("--include-seen", help="Keep the items the user has seen.")] = False,
    silo: SiloOpt = None,
    model: ModelPathOpt = None,
    personalized: PersonalizedOpt = None,
) -> None:
    """Top-K items for a user of one silo: raw item ids, scores, titles when the data has them."""
    from common.errors import FedrecError
    from serving.silo import Recommender, ServingError
    from serving.sources import open_source

    given = [name for name, value in (("--user", user), ("--users", users), ("--history", history)) if value]
    if len(given) != 1:
        fail("give exactly one of --user USER_ID, --users FILE (with --out) or --history ITEM_IDS")
    if users is not None and out is None:
        fail("--users needs --out FILE.parquet or FILE.csv")
    if out is not None and out.suffix not in (".parquet", ".csv"):
        fail(f"--out {out}: the file must end in .parquet or .csv")
    try:
        ids: list[str] = []
        if users is not None:
            if not users.is_file():
                raise ServingError(f"--users {users} does not exist")
            ids = [line.strip() for line in users.read_text().splitlines() if line.strip()]
            if not ids:
                raise ServingError(f"--users {users} holds no user id")
        first = user if user is not None else (ids[0] if ids else None)
        rec = Recommender(open_source(path, silo=silo, model=model, user=first, personalized=personalized))
        if history is not None:
            items = [i.strip() for i in history.split(",") if i.strip()]
            results = [rec.recommend_new_user(items, k, include_seen=include_seen)]
        else:
            results = rec.recommend(ids or [str(user)], k, include_seen=include_seen)
    except FedrecError as e:
        fail(e)
    if out is not None:
        _write_batch(results, out)
        console.print(f"{sum(len(r.items) for r in results)} rows for {len(results)} users: {out}")
        return
    (result,) = results
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    which = "personalized" if rec.served.personalized else "global"
    m, weight = rec.served.train.get(RECENT_ITEMS_KEY), rec.served.train.get(RECENT_WEIGHT_KEY)
    if rec.served.personalized and m and weight:  # a recency copy: say which shift it holds
        which += f": rows shifted toward the last {int(m)} items, β = {weight:g}"
    console.print(
        f"[bold]top {k} for user {result.user}[/] (silo {rec.silo}, {rec.served.kind}, {which}, {rec.served.source})"
    )
    for rank, entry in enumerate(result.items, 1):
        title = f"  {entry['title']}" if "title" in entry else ""
        console.print(f"{rank:3d}. {entry['item']}  {fmt(entry['score'])}{title}", markup=False)


def _write_batch(results: list, out: Path) -> None:  # type: ignore[type-arg]
    import pandas as pd

    rows = [
        {"user": r.user, "rank": rank, "item": e["item"], "score": e["score"], "title": e.get("title")}
        for r in results
        for rank, e in enumerate(r.items, 1)
    ]
    frame = pd.DataFrame(rows, columns=["user", "rank", "item", "score", "title"])
    with os_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".parquet":
            frame.to_parquet(out, index=False)
        else:
            frame.to_csv(out, index=False)


def export(
    path: PathArg,
    out: Annotated[Path, typer.Option("--out", help="New directory for the bundle.")],
    silo: SiloOpt = None,
    model: ModelPathOpt = None,
    personalized: PersonalizedOpt = None,
) -> None:
    """Write one silo's bundle: safetensors (shared model, its users' rows), id maps, manifest.json."""
    from common.errors import FedrecError
    from serving.bundle import write_bundle
    from serving.sources import open_source

    try:
        served = open_source(path, silo=silo, model=model, personalized=personalized)
        with os_errors(out):
            manifest = write_bundle(served, out)
    except FedrecError as e:
        fail(e)
    which = "personalized" if served.personalized else "global"
    console.print(
        f"bundle of silo {served.silo} ({served.kind}, {which}, {len(served.user_ids)} users): {manifest.parent}"
    )
