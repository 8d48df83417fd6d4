"""fedrec ServerApp: wires Flower's runtime to :func:`server.federation.run_federation`."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import run_federation

app = ServerApp()


# ---------------------------------------------------------------- main
@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated training described by the run config."""
    run_federation(grid, context.run_config)
