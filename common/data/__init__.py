"""Interaction data: loaders, synthetic generator, splits and partitioners."""
