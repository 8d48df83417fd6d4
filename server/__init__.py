"""fedrec ServerApp: aggregation of the shared model, checkpoints and the run report."""
