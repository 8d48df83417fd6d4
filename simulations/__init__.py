"""fedrec runners: the CLI, simulation launcher, centralized baseline, benchmarks."""
