"""Where sarft keeps its state on disk: one default, read by the engines and the service alike."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "SARFT_HOME"
DEFAULT_HOME = Path("~/.sarft")
"""The SQLite file, uploads, artifacts and the converted bundled model live under it."""


def sarft_home() -> Path:
    """``$SARFT_HOME``, or the default when it is unset."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()
