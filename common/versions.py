"""Versions of the software a result depends on (written into run configs and ledgers)."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("fedrec", "flwr", "torch", "numpy", "opacus", "dp-accounting")


def library_versions() -> dict[str, str]:
    """Python's version and each of :data:`PACKAGES`' ("not installed" if absent)."""
    out = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
