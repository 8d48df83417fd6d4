"""Serving: a finished run's recommendations for one silo's users (scoring, top-K, bundles, fold-in)."""
