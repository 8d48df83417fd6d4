"""fedrec ServerApp: wires Flower's runtime to :func:`server.federation.run_federation`."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.run_config import with_defaults
from server.federation import run_federation

app = ServerApp()


# ---------------------------------------------------------------- main
@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated training described by the run config (missing keys: the defaults)."""
    run_federation(grid, with_defaults(context.run_config))
