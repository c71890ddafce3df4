"""Migration 0004 on a database that already holds scores: the difference column is filled
from each stored score (NULL where the JSON holds NaN), and the migration reverses cleanly.
Runs on SQLite and on the test Postgres."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command

from service.core.migrate import alembic_config
from tests.service.conftest import PG_ADMIN

SCORES = {0: 0.25, 1: -1.5, 2: math.nan}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('migration') / 'sarft.db'}"
        return
    name = f"sarft_migration_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_0004_backfills_the_difference_and_reverses(url: str) -> None:
    config = alembic_config(url)
    command.upgrade(config, "0003")
    engine = sa.create_engine(url)
    now = "2026-12-01 00:00:00+00:00"
    with engine.begin() as db:
        db.execute(
            sa.text(f"INSERT INTO tenants (id, name, created_at) VALUES ('t', 't', '{now}')")
        )
        db.execute(sa.text(
            "INSERT INTO roles (id, tenant_id, name, profile, role_prompt, unsafe_prompt, "
            f"created_at) VALUES ('r', 't', 'R', 'p', 'rp', 'up', '{now}')"
        ))  # fmt: skip
        db.execute(sa.text(
            "INSERT INTO datasets (id, tenant_id, role_id, filename, format, num_samples, bytes,"
            f" sha256, status, created_at) VALUES ('d', 't', 'r', 'f', 'chat', 3, 1, 'x', "
            f"'ready', '{now}')"
        ))  # fmt: skip
        db.execute(sa.text(
            "INSERT INTO scoring_jobs (id, tenant_id, dataset_id, status, backend, dtype, margin,"
            " compute_reference, batch_size, total, processed, created_at) VALUES ('j', 't', 'd',"
            f" 'succeeded', 'transformers', 'float32', 0, true, 8, 3, 3, '{now}')"
        ))  # fmt: skip
        for idx, delta in SCORES.items():
            db.execute(
                sa.text("INSERT INTO sample_scores (job_id, idx, flagged, scores) "
                        "VALUES ('j', :i, :f, :s)"),
                {"i": idx, "f": delta > 0, "s": json.dumps({"delta": delta})},
            )  # fmt: skip
    command.upgrade(config, "head")
    with engine.connect() as db:
        rows: dict[int, float | None] = dict(
            db.execute(sa.text("SELECT idx, delta FROM sample_scores")).tuples().all()
        )
        assert rows == {0: 0.25, 1: -1.5, 2: None}
        assert db.execute(sa.text("SELECT count(*) FROM sample_reviews")).scalar() == 0
    command.downgrade(config, "0003")
    with engine.connect() as db:
        columns = {c["name"] for c in sa.inspect(db).get_columns("sample_scores")}
        assert "delta" not in columns and not sa.inspect(db).has_table("sample_reviews")
    engine.dispose()
