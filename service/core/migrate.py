"""Apply Alembic migrations programmatically (`sarft db upgrade`, API start-up)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from service.core.config import get_settings
from service.core.state_dirs import secure_state

# An installed package, so `pip install .` (not only editable installs) finds it.
MIGRATIONS = Path(migrations.__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url or get_settings().sqlalchemy_url)
    return config


def upgrade(url: str | None = None) -> None:
    settings = get_settings()
    if (url or settings.sqlalchemy_url).startswith("sqlite"):
        secure_state(settings)
    command.upgrade(alembic_config(url), "head")
