"""fedrec shared code: config, data, models, metrics and privacy (no Flower runtime)."""
