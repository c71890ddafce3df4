"""The database schema (SQLAlchemy 2.0). Migrations in migrations/ create it."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from service.core.db import Base, UTCDateTime, utcnow
from trainer.run_spec import Phase


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # sha256 of the key: keys are shown once and never stored in the clear.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hint: Mapped[str] = mapped_column(String(20))
    # Who uses the key (a reviewer's name in the audit trail); null: "key ...<hint>".
    name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Role(Base):
    __tablename__ = "roles"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    profile: Mapped[str] = mapped_column(Text)
    role_prompt: Mapped[str] = mapped_column(Text)
    unsafe_prompt: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    role_id: Mapped[str] = mapped_column(ForeignKey("roles.id", ondelete="RESTRICT"), index=True)
    filename: Mapped[str] = mapped_column(String(300))
    format: Mapped[str] = mapped_column(String(20))
    num_samples: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default="ready")
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DatasetSample(Base):
    __tablename__ = "dataset_samples"
    dataset_id: Mapped[str] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    line: Mapped[int] = mapped_column(Integer)
    # The record exactly as uploaded (JSON text), so downloads return the user's own form.
    record: Mapped[str] = mapped_column(Text)


class ScoringJob(Base):
    __tablename__ = "scoring_jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[str] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.QUEUED)
    model: Mapped[str | None] = mapped_column(String(300), nullable=True)
    backend: Mapped[str] = mapped_column(String(20))
    dtype: Mapped[str] = mapped_column(String(20))
    margin: Mapped[float] = mapped_column(Float)
    compute_reference: Mapped[bool] = mapped_column(Boolean)
    batch_size: Mapped[int] = mapped_column(Integer)
    total: Mapped[int] = mapped_column(Integer)
    processed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ScoringShard(Base):
    """A contiguous slice of a job's samples: the unit a worker picks up."""

    __tablename__ = "scoring_shards"
    job_id: Mapped[str] = mapped_column(
        ForeignKey("scoring_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    start_idx: Mapped[int] = mapped_column(Integer)
    end_idx: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class SampleScore(Base):
    __tablename__ = "sample_scores"
    job_id: Mapped[str] = mapped_column(
        ForeignKey("scoring_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    flagged: Mapped[bool] = mapped_column(Boolean)  # RDS's flag; a review may overrule it
    scores: Mapped[str] = mapped_column(Text)  # the JSON object `sarft score` writes
    # s_unsafe - s_role (the scores' "delta") as a column, so a review list sorts by risk in
    # the database; null where it is not finite.
    delta: Mapped[float | None] = mapped_column(Float, nullable=True)


Index("ix_sample_scores_flagged", SampleScore.job_id, SampleScore.flagged, SampleScore.idx)
Index("ix_sample_scores_delta", SampleScore.job_id, SampleScore.delta, SampleScore.idx)


class ReviewDecision(StrEnum):
    FLAG = "flag"
    KEEP = "keep"


class SampleReview(Base):
    """A reviewer's decision on one scored sample: it overrules RDS's flag (the effective
    flag); no row: RDS's flag stands. Every change is also a job event (the audit trail)."""

    __tablename__ = "sample_reviews"
    job_id: Mapped[str] = mapped_column(
        ForeignKey("scoring_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    decision: Mapped[str] = mapped_column(String(10))
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    reviewer: Mapped[str] = mapped_column(String(100))
    reviewed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(10), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class FineTuningJob(Base):
    """A fine-tuning run on a scored dataset: train, evaluate, report."""

    __tablename__ = "fine_tuning_jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[str] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    scoring_job_id: Mapped[str] = mapped_column(
        ForeignKey("scoring_jobs.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.QUEUED)
    # queued, loading, evaluating_base, training, evaluating_tuned, reporting, done
    phase: Mapped[str] = mapped_column(String(30), default=Phase.QUEUED)
    model: Mapped[str | None] = mapped_column(String(300), nullable=True)
    method: Mapped[str] = mapped_column(String(20))
    # trainer.config.TrainConfig.to_dict(): every setting that decides the outcome.
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The evaluation request as accepted (sets resolved), or null to skip evaluation.
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # A separate validation set and the scoring job whose flags its KL uses (null: held out).
    validation_dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), nullable=True, index=True
    )
    validation_scoring_job_id: Mapped[str | None] = mapped_column(
        ForeignKey("scoring_jobs.id", ondelete="CASCADE"), nullable=True
    )
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # "metadata" is the declarative base's own attribute: the column keeps the API's name.
    user_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(40), nullable=True)
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    estimated_finish: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(400), nullable=True)
    # The effective flags it trains on, fixed at creation: counts and the overrules of RDS's
    # flags (sample indices each way), so later reviews change neither the run nor its report.
    curation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class FineTuningCheckpoint(Base):
    """A checkpoint a fine-tuning job wrote: its step, metrics and weights archive."""

    __tablename__ = "fine_tuning_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step_number"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True
    )
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The weights archive, relative to the job's artifact directory.
    archive: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
