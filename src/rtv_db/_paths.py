"""Where rtv-db keeps its files when no directory is configured."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    """``/var/lib/rtv-db`` as root, the platform's user data folder otherwise.

    As root the embedded server runs as another system user, which must be able to traverse
    every parent of the data directory; the wheel would widen permissions along the way, so
    root's data does not go under ``/root``.
    """
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/rtv-db")
    import platformdirs

    return Path(platformdirs.user_data_dir("rtv-db", appauthor=False))
