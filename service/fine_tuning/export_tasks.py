"""Merged-model exports of succeeded fine-tuning jobs: what the API asks for and what a training
worker runs.

A LoRA job publishes only its adapter. On request a training worker loads the base model,
merges the adapter (:func:`trainer.export.merge_adapter`) and archives the result beside the
job's other artifacts. No table records an export: the archive present means ready, the queue
holding the export's task means queued or running (the job's latest export event tells which),
and the job's events record every attempt, and why one failed. A full fine-tuning job already
published full weights: its checkpoint archive is its export, with no task to run.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.db import session_scope
from service.core.errors import Conflict, ServiceUnavailable
from service.core.events import add_event
from service.core.job_state import WORKER_NAME
from service.core.queue import TRAINING_QUEUE, dispatch, get_queue, require_queue
from service.fine_tuning.storage import artifact, artifact_dir
from service.models import FineTuningJob, JobEvent, JobStatus
from trainer.artifacts import ADAPTER_ARCHIVE, MERGED_MODEL_ARCHIVE, MODEL_ARCHIVE
from worker.packaged_models import is_bundled

log = logging.getLogger(__name__)

EXPORT_QUEUED = "merged model export queued"
EXPORT_STARTED = "merged model export started"
EXPORT_FINISHED = "merged model export finished"
EXPORT_FAILED = "merged model export failed"
_EXPORT_EVENTS = (EXPORT_QUEUED, EXPORT_STARTED, EXPORT_FINISHED, EXPORT_FAILED)
LOCK_FILE = ".merged_model.lock"

ExportStatus = Literal["queued", "running", "ready"]


class ExportInProgress(Conflict):
    """409 with a code of its own: a client polls on it, and stops on any other 409."""

    code = "export_in_progress"


@dataclass(frozen=True)
class ExportState:
    status: ExportStatus | None  # None: not exported, and nothing queued
    archive: Path | None = None  # once ready
    last_error: str | None = None  # the latest attempt's error, when it failed


def task_id(job_id: str) -> str:
    return f"export-{job_id}"


def _is_lora(job: FineTuningJob) -> bool:
    return job.hyperparameters.get("lora") is not None


def export_state(session: Session, job: FineTuningJob) -> ExportState:
    """Where the job's export stands; a 409 unless the job succeeded, a 404 if its weights (the
    adapter or checkpoint archive) are no longer on this server."""
    if job.status != JobStatus.SUCCEEDED:
        raise Conflict(f"the job is {job.status}; its model can be exported once it has succeeded")
    if not _is_lora(job):
        return ExportState("ready", artifact(job, MODEL_ARCHIVE))
    merged = artifact_dir(job.id) / MERGED_MODEL_ARCHIVE
    if merged.is_file():
        return ExportState("ready", merged)
    artifact(job, ADAPTER_ARCHIVE)
    require_queue()
    # Asked before looking at the file again: a task that ends in between has written it.
    held = get_queue().holds(TRAINING_QUEUE, task_id(job.id))
    if merged.is_file():
        return ExportState("ready", merged)
    latest = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job.id, JobEvent.message.in_(_EXPORT_EVENTS))
        .order_by(JobEvent.id.desc())
        .limit(1)
    ).first()
    if held:
        running = latest is not None and latest.message == EXPORT_STARTED
        return ExportState("running" if running else "queued")
    if latest is not None and latest.message == EXPORT_FAILED:
        return ExportState(None, last_error=str((latest.data or {}).get("error")))
    if latest is not None and latest.message == EXPORT_STARTED:  # its worker died mid-export
        return ExportState(None, last_error="the worker stopped before it finished")
    return ExportState(None)


def request_export(session: Session, job: FineTuningJob) -> tuple[ExportStatus, Path | None]:
    """Queue the export unless it is ready, queued or running (a failed one runs again); the
    status, and the archive once ready."""
    state = export_state(session, job)
    if state.status is not None:
        return state.status, state.archive
    # Concurrent requests queue one task: the second waits here until the first commits, and
    # then finds the task in the queue.
    session.execute(select(FineTuningJob.id).where(FineTuningJob.id == job.id).with_for_update())
    state = export_state(session, job)
    if state.status is not None:
        return state.status, state.archive
    add_event(session, job.id, EXPORT_QUEUED)
    # Flushed first, so that this event sorts before the worker's "started".
    session.flush()
    # Enqueued before the commit (the task reads no row this request writes): nothing sweeps
    # lost exports, so a failed enqueue must fail the request.
    if not dispatch(TRAINING_QUEUE, export_merged_model, job.id, job_id=task_id(job.id)):
        raise ServiceUnavailable("the job queue (Redis) is unreachable; nothing was queued, retry")
    return "queued", None


def not_ready(job: FineTuningJob, state: ExportState) -> Conflict:
    """The 409 of a download asked for before the export is ready."""
    post = f"POST /v1/fine_tuning/jobs/{job.id}/model"
    if state.status is not None:
        return ExportInProgress(f"the merged model is being exported ({state.status}); retry")
    if state.last_error is not None:
        return Conflict(f"the last export failed ({state.last_error}); {post} to try again")
    return Conflict(f"the merged model has not been exported: {post} first, then download it")


# --- the task ------------------------------------------------------------------------------------


def export_merged_model(job_id: str) -> None:
    """The entry point the training queue calls."""
    # Imported here: the API imports this module to enqueue, and must not load torch.
    from trainer.export import discard_partial, merge_adapter

    with session_scope() as session:
        job = session.get(FineTuningJob, job_id)
        if job is None or job.status != JobStatus.SUCCEEDED or not _is_lora(job):
            log.warning("fine-tuning job %s has no adapter to merge; export skipped", job_id)
            return
        model = None if is_bundled(job.model) else job.model
    out = artifact_dir(job_id)
    with _exclusive(out / LOCK_FILE) as ours:
        if not ours or (out / MERGED_MODEL_ARCHIVE).is_file():
            return  # another worker exports it, or already did
        _record(job_id, EXPORT_STARTED, worker=WORKER_NAME)
        started = time.monotonic()
        try:
            archive = merge_adapter(out / ADAPTER_ARCHIVE, out, model)
        except Exception as exc:
            log.exception("merged model export of %s failed", job_id)
            discard_partial(out)
            _record(job_id, EXPORT_FAILED, level="error", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            gc.collect()  # the model's weights, before the worker's next job loads its own
        _record(
            job_id,
            EXPORT_FINISHED,
            bytes=archive.stat().st_size,
            seconds=round(time.monotonic() - started, 1),
        )


def _record(job_id: str, message: str, level: str = "info", **data: object) -> None:
    with session_scope() as session:
        add_event(session, job_id, message, level=level, **data)


@contextmanager
def _exclusive(path: Path) -> Iterator[bool]:
    """Whether this process holds ``path``'s lock for the block: the artifacts directory is
    shared by every worker, and two exports into one directory would write the same files."""
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
