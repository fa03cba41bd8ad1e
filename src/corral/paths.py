"""Default locations, kept free of heavy imports: the CLI needs them before anything else."""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/corral")
    return Path.home() / ".local/share/corral"


def default_cache() -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/corral")
    return Path.home() / ".cache/corral"
