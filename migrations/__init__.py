"""Alembic migrations of the sarft database (applied by `sarft db upgrade` and `sarft serve`)."""
