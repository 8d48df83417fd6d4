"""Real Flower processes: credentials, the SuperLink/SuperNode launcher, local deployment."""
