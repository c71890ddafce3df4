"""sample reviews, the difference as a column, key names, fine-tuning curation

A reviewer's decision per scored sample (the effective flag), ``sample_scores.delta`` so a
review list sorts by risk in the database, a name per API key (the reviewer in the audit
trail), and the flags a fine-tuning job trained on.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 10:20:00.000000
"""

from __future__ import annotations

import json
import math

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BACKFILL_PAGE = 5000


def upgrade() -> None:
    op.create_table(
        "sample_reviews",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=10), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("reviewer", sa.String(length=100), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["scoring_jobs.id"],
            name=op.f("fk_sample_reviews_job_id_scoring_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", "idx", name=op.f("pk_sample_reviews")),
    )
    op.add_column("api_keys", sa.Column("name", sa.String(length=100), nullable=True))
    op.add_column("fine_tuning_jobs", sa.Column("curation", sa.JSON(), nullable=True))
    op.add_column("sample_scores", sa.Column("delta", sa.Float(), nullable=True))
    _backfill_delta()
    op.create_index(
        "ix_sample_scores_delta", "sample_scores", ["job_id", "delta", "idx"], unique=False
    )


def _backfill_delta() -> None:
    """Copies each stored score's "delta" into the column, page by page in key order, in
    Python: the JSON may hold NaN or Infinity, which neither database's JSON functions read."""
    bind = op.get_bind()
    scores = sa.table(
        "sample_scores",
        sa.column("job_id", sa.String),
        sa.column("idx", sa.Integer),
        sa.column("scores", sa.Text),
        sa.column("delta", sa.Float),
    )
    last: tuple[str, int] = ("", -1)
    while True:
        rows = bind.execute(
            sa.select(scores.c.job_id, scores.c.idx, scores.c.scores)
            .where(sa.tuple_(scores.c.job_id, scores.c.idx) > sa.tuple_(*last))
            .order_by(scores.c.job_id, scores.c.idx)
            .limit(BACKFILL_PAGE)
        ).all()
        if not rows:
            return
        updates = []
        for job_id, idx, text in rows:
            delta = json.loads(text).get("delta")
            finite = isinstance(delta, int | float) and math.isfinite(delta)
            updates.append({"j": job_id, "i": idx, "d": float(delta) if finite else None})
        bind.execute(
            sa.update(scores)
            .where(scores.c.job_id == sa.bindparam("j"), scores.c.idx == sa.bindparam("i"))
            .values(delta=sa.bindparam("d")),
            updates,
        )
        last = (rows[-1][0], rows[-1][1])


def downgrade() -> None:
    op.drop_index("ix_sample_scores_delta", table_name="sample_scores")
    with op.batch_alter_table("sample_scores") as batch:
        batch.drop_column("delta")
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.drop_column("curation")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("name")
    op.drop_table("sample_reviews")
