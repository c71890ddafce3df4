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


CONVERTED_MARKER = ".sarft-complete"
"""Written last into a converted model's directory: its presence means the copy is whole."""


def model_cache_dir() -> Path:
    """Where packaged models are converted once into dense checkpoints."""
    return sarft_home() / "models"


def is_converted(name: str, cache_dir: Path | None = None) -> bool:
    """Whether the packaged model ``name`` has a whole converted copy (it loads without its
    packages)."""
    return ((cache_dir or model_cache_dir()) / name / CONVERTED_MARKER).exists()
