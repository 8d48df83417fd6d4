"""fedrec benchmarks and experiments, run from a checkout as ``python -m benchmarks.<name>``."""
