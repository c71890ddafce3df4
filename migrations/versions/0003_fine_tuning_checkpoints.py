"""fine-tuning checkpoints, validation and job fields

The checkpoints a job wrote, a separate validation set, and OpenAI's job fields (suffix,
metadata, error code, trained tokens, estimated finish, the fine-tuned model's name).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 15:28:17.002821
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fine_tuning_checkpoints",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("step_number", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("archive", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["fine_tuning_jobs.id"],
            name=op.f("fk_fine_tuning_checkpoints_job_id_fine_tuning_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fine_tuning_checkpoints")),
        sa.UniqueConstraint(
            "job_id", "step_number", name=op.f("uq_fine_tuning_checkpoints_job_id")
        ),
    )
    with op.batch_alter_table("fine_tuning_checkpoints", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_fine_tuning_checkpoints_job_id"), ["job_id"], unique=False
        )

    with op.batch_alter_table("fine_tuning_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("validation_dataset_id", sa.String(length=40), nullable=True))
        batch_op.add_column(
            sa.Column("validation_scoring_job_id", sa.String(length=40), nullable=True)
        )
        batch_op.add_column(sa.Column("suffix", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("metadata", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("error_code", sa.String(length=40), nullable=True))
        batch_op.add_column(
            sa.Column("trained_tokens", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("estimated_finish", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("fine_tuned_model", sa.String(length=400), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_fine_tuning_jobs_validation_dataset_id"),
            ["validation_dataset_id"],
            unique=False,
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_fine_tuning_jobs_validation_scoring_job_id_scoring_jobs"),
            "scoring_jobs",
            ["validation_scoring_job_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_fine_tuning_jobs_validation_dataset_id_datasets"),
            "datasets",
            ["validation_dataset_id"],
            ["id"],
            ondelete="CASCADE",
        )


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_fine_tuning_jobs_validation_dataset_id_datasets"), type_="foreignkey"
        )
        batch_op.drop_constraint(
            batch_op.f("fk_fine_tuning_jobs_validation_scoring_job_id_scoring_jobs"),
            type_="foreignkey",
        )
        batch_op.drop_index(batch_op.f("ix_fine_tuning_jobs_validation_dataset_id"))
        batch_op.drop_column("fine_tuned_model")
        batch_op.drop_column("estimated_finish")
        batch_op.drop_column("trained_tokens")
        batch_op.drop_column("error_code")
        batch_op.drop_column("metadata")
        batch_op.drop_column("suffix")
        batch_op.drop_column("validation_scoring_job_id")
        batch_op.drop_column("validation_dataset_id")

    with op.batch_alter_table("fine_tuning_checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fine_tuning_checkpoints_job_id"))

    op.drop_table("fine_tuning_checkpoints")
