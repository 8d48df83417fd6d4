"""The ``fedrec`` command: simulate, centralized baseline, audit, data, deploy."""
