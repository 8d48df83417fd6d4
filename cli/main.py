"""The ``fedrec`` command: simulate, centralized baseline, audit, recommend, export, data, deploy.

Every command validates its settings and data *before* starting anything, so bad
input fails fast with a message naming the key, file or line.
"""

from __future__ import annotations

import subprocess

import typer

from cli.audit import audit
from cli.centralized import centralized
from cli.data import data_app
from cli.deploy import deploy_app
from cli.output import fail
from cli.recommend import export, recommend
from cli.simulate import simulate

# The command modules import torch, Flower's runtime and the DP accountants inside
# the commands, so --help and argument errors answer at once.
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.command()(simulate)
app.command()(centralized)
app.command()(audit)
app.command()(recommend)
app.command()(export)
app.add_typer(data_app, name="data", help="Prepare data for deployment: one directory per silo.")
app.add_typer(deploy_app, name="deploy", help="Run on real Flower processes: SuperLink, SuperNodes, TLS, node auth.")


def main() -> None:
    """Entry point of the ``fedrec`` console script."""
    try:
        app()
    except subprocess.SubprocessError as e:  # pragma: no cover - process plumbing
        fail(e)


if __name__ == "__main__":
    main()
