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


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (0700): sarft's state holds every
    tenant's datasets, key hashes and adapters."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)  # mkdir's mode is cut by the umask, and an older home may be 0755
    return path


def private_file(path: Path) -> Path:
    """``path`` as a file only its owner can read (0600), created empty when absent."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    path.chmod(0o600)
    return path
