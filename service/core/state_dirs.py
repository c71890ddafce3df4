"""The server's state on disk, owner-only: the home, the SQLite database, uploads, artifacts.

Any local user could otherwise read every tenant's datasets and key hashes (the defaults of
mkdir and SQLite are 0755 and 0644).
"""

from __future__ import annotations

import logging
import os

from service.core.config import Settings
from worker.home import private_dir, private_file

log = logging.getLogger(__name__)

OWNER_ONLY_UMASK = 0o077
"""Files a server process creates later (artifacts, checkpoints, SQLite's WAL) are 0600 too."""


def secure_state(settings: Settings) -> None:
    """Create (or tighten) the state directories and the SQLite file as owner-only."""
    for directory in (settings.home_dir, settings.uploads_dir, settings.artifacts_path):
        try:
            private_dir(directory)
        except PermissionError as exc:  # e.g. a volume another user owns: leave it, say so
            log.warning("could not make %s owner-only: %s", directory, exc)
    if settings.sqlalchemy_url.startswith("sqlite:///"):
        private_file(settings.home_dir / "sarft.db")


def owner_only_umask() -> None:
    """For the long-running server processes: everything they create is owner-only."""
    os.umask(OWNER_ONLY_UMASK)
