"""State changes every job kind makes the same way: cancel by the user, fail with a reason."""

from __future__ import annotations

import os
import socket
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from service.core.db import utcnow
from service.core.errors import Conflict
from service.core.events import add_event
from service.models import FineTuningJob, JobStatus, ScoringJob

Job = TypeVar("Job", ScoringJob, FineTuningJob)

WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"
"""Recorded on the rows a process runs, so an event or a lost job names its worker."""


class JobCancelled(Exception):
    """The user cancelled the job while it ran; the task stops and records nothing more."""


def cancel(session: Session, job: Job) -> Job:
    """Cancel a queued or running job (409 once finished); its worker stops at its next check."""
    if JobStatus(job.status).finished:
        raise Conflict(f"the job is already {job.status}")
    job.status = JobStatus.CANCELLED
    job.finished_at = utcnow()
    add_event(session, job.id, "cancelled by the user")
    session.flush()
    return job


def fail(
    session: Session,
    model: type[Job],
    job_id: str,
    error: str,
    code: str | None = None,
    **data: Any,
) -> None:
    """Fail the job with ``error`` unless it already finished; the row lock orders racing
    workers and reapers. ``code`` is kept where the job kind has one (fine-tuning jobs)."""
    job = session.get(model, job_id, with_for_update=True)
    if job is None or JobStatus(job.status).finished:
        return
    job.status = JobStatus.FAILED
    job.error = error
    if isinstance(job, FineTuningJob):
        job.error_code = code or "internal_error"
    job.finished_at = utcnow()
    add_event(session, job_id, f"job failed: {error}", level="error", **data)
