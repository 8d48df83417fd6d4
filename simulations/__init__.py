"""In-process runtimes and experiment settings: the in-process federation, the centralized baseline, configs/."""
