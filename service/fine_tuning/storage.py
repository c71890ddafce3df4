"""Where a fine-tuning job's artifacts live on this server, and which of them may be served."""

from __future__ import annotations

from pathlib import Path

from service.core.config import get_settings
from service.core.errors import Conflict, NotFound
from service.models import FineTuningJob, JobStatus


def artifact_dir(job_id: str) -> Path:
    return get_settings().artifacts_path / "fine_tuning" / job_id


def artifact(job: FineTuningJob, name: str) -> Path:
    """A finished job's file, or a 409 (not succeeded) / 404 (removed from the server)."""
    if job.status != JobStatus.SUCCEEDED:
        raise Conflict(f"the job is {job.status}; artifacts are ready once it has succeeded")
    path = artifact_dir(job.id) / name
    if not path.is_file():
        raise NotFound(f"{name} of job {job.id} is no longer on this server")
    return path
