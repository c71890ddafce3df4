"""Fine-tuning job tasks, run by the training queue's RQ worker or the embedded queue.

A task claims the job, reads its rows once into plain data (:class:`trainer.run_spec.RunInputs`)
and hands them to the database-free pipeline (:func:`trainer.pipeline.run_fine_tuning`), whose
callbacks record phases, steps and evaluation progress as job events and ask whether the user
cancelled. Each optimizer step updates the job's progress.

A job does not resume: a failure or cancellation leaves it failed or cancelled with the reason,
and a worker that dies mid-job stops heartbeating, so the reaper (:func:`reap_stale_jobs`, run
by every ``sarft worker`` and by the embedded server) fails it. Nothing stays ``running``.
"""

from __future__ import annotations

import gc
import logging
import shutil
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.core import job_state
from service.core.config import get_settings
from service.core.db import after_commit, session_scope, utcnow
from service.core.events import add_event
from service.core.heartbeat import Heartbeat
from service.core.job_state import WORKER_NAME
from service.core.queue import TRAINING_QUEUE, dispatch, get_queue
from service.datasets.repository import load_samples
from service.fine_tuning.storage import artifact_dir
from service.models import Dataset, FineTuningJob, JobStatus, Role, ScoringJob
from service.roles.service import prompts_of
from service.scoring_jobs.service import load_scores
from trainer.config import EvalConfig, TrainConfig
from trainer.run_spec import EvalResources, Phase, RunCancelled, RunHooks, RunInputs
from worker.packaged_models import is_bundled

log = logging.getLogger(__name__)


def enqueue(session: Session, job_id: str) -> None:
    """Enqueue after the surrounding transaction commits, never before."""
    after_commit(
        session, lambda: dispatch(TRAINING_QUEUE, run_fine_tuning_job, job_id, job_id=job_id)
    )


def run_fine_tuning_job(job_id: str) -> None:
    """The entry point the queues call."""
    # Imported here: the API imports this module to enqueue, and must not load torch.
    from trainer.pipeline import run_fine_tuning

    settings = get_settings()
    with session_scope() as session:
        if not _claim(session, job_id):
            return
    beat = Heartbeat(
        job_id,
        settings.heartbeat_s,
        lambda: (
            update(FineTuningJob).where(FineTuningJob.id == job_id).values(heartbeat_at=utcnow())
        ),
    )
    resources = EvalResources(settings.eval_set_paths, settings.judge_api_key)
    try:
        with beat:
            result = run_fine_tuning(
                _load_inputs(job_id),
                artifact_dir(job_id),
                resources=resources,
                hooks=_hooks(job_id),
            )
    except RunCancelled:
        log.info("fine-tuning job %s cancelled", job_id)
        shutil.rmtree(artifact_dir(job_id), ignore_errors=True)  # partial files serve nobody
        return
    except Exception as exc:
        log.exception("fine-tuning job %s failed", job_id)
        with session_scope() as session:
            fail(session, job_id, f"{type(exc).__name__}: {exc}")
        shutil.rmtree(artifact_dir(job_id), ignore_errors=True)
        raise
    finally:
        gc.collect()
    with session_scope() as session:
        _succeed(session, job_id, result)


def _claim(session: Session, job_id: str) -> bool:
    """Mark a queued job running on this worker; False when there is nothing to run."""
    job = session.get(FineTuningJob, job_id, with_for_update=True)
    if job is None:
        log.warning("fine-tuning job %s no longer exists", job_id)
        return False
    if job.status != JobStatus.QUEUED:
        return False  # cancelled while queued, or already taken
    job.status, job.phase = JobStatus.RUNNING, Phase.LOADING
    job.attempts += 1
    job.worker = WORKER_NAME
    job.started_at = job.heartbeat_at = utcnow()
    add_event(session, job_id, "job started", worker=WORKER_NAME)
    return True


def _succeed(session: Session, job_id: str, result: dict[str, Any]) -> None:
    job = session.get(FineTuningJob, job_id, with_for_update=True)
    if job is None or job.status != JobStatus.RUNNING:
        return  # cancelled at the last moment: the artifacts stay unpublished
    job.status, job.phase = JobStatus.SUCCEEDED, Phase.DONE
    job.result = result
    job.finished_at = utcnow()
    headline = {k: result[k] for k in ("steps", "final", "evaluation")}
    add_event(session, job_id, "job succeeded", **headline)


def fail(session: Session, job_id: str, error: str) -> None:
    # Locked before reading the phase the event records, as job_state.fail locks it again.
    job = session.get(FineTuningJob, job_id, with_for_update=True)
    phase = None if job is None else job.phase
    job_state.fail(session, FineTuningJob, job_id, error, phase=phase)


def _load_inputs(job_id: str) -> RunInputs:
    """The job's rows as the pipeline's plain data, read in one transaction."""
    with session_scope() as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None
        dataset = session.get(Dataset, job.dataset_id)
        scoring = session.get(ScoringJob, job.scoring_job_id)
        if dataset is None or scoring is None:
            raise RuntimeError("the dataset or its scoring job was deleted")
        role = session.get(Role, dataset.role_id)
        assert role is not None
        samples = load_samples(session, dataset)
        scores = load_scores(session, scoring.id)
        missing = [s.index for s in samples if s.index not in scores]
        if missing:
            raise RuntimeError(f"{len(missing)} samples have no score (first: {missing[0]})")
        return RunInputs(
            run_id=job.id,
            model=None if is_bundled(job.model) else job.model,
            config=TrainConfig.from_dict(job.hyperparameters),
            evaluation=None if job.evaluation is None else EvalConfig.from_dict(job.evaluation),
            prompts=prompts_of(role),
            samples=samples,
            scores=[scores[s.index] for s in samples],
            margin=scoring.margin,
        )


# --- the pipeline's callbacks: events, progress, cancellation -----------------------------------


def _hooks(job_id: str) -> RunHooks:
    def cancelled() -> bool:
        with session_scope() as session:
            status = session.scalar(select(FineTuningJob.status).where(FineTuningJob.id == job_id))
        return status != JobStatus.RUNNING

    def on_phase(phase: Phase, message: str, data: dict[str, Any]) -> None:
        with session_scope() as session:
            session.execute(
                update(FineTuningJob).where(FineTuningJob.id == job_id).values(phase=phase)
            )
            add_event(session, job_id, message, phase=phase.value, **data)

    def on_step(metrics: dict[str, float]) -> None:
        step, total = int(metrics["step"]), int(metrics["total_steps"])
        with session_scope() as session:
            session.execute(
                update(FineTuningJob)
                .where(FineTuningJob.id == job_id)
                .values(step=step, total_steps=total, heartbeat_at=utcnow())
            )
            data: dict[str, Any] = {
                k: round(float(v), 6) for k, v in metrics.items() if k != "step"
            }
            add_event(session, job_id, f"step {step}/{total}", step=step, **data)

    def on_generated(which: str, stage: str, done: int, total: int) -> None:
        if done == total:  # one event per prompt set, not per batch
            with session_scope() as session:
                add_event(session, job_id, f"{which} model: {stage} generated", done=done)

    return RunHooks(
        on_phase=on_phase, on_step=on_step, on_generated=on_generated, should_stop=cancelled
    )


# --- lost workers ------------------------------------------------------------------------------


def reap_stale_jobs() -> int:
    """Fail running jobs whose worker stopped heartbeating (killed, out of memory, host lost)."""
    cutoff = utcnow() - timedelta(seconds=get_settings().stale_after_s)
    with session_scope() as session:
        stale = session.scalars(
            select(FineTuningJob)
            .where(FineTuningJob.status == JobStatus.RUNNING, FineTuningJob.heartbeat_at < cutoff)
            .with_for_update(skip_locked=True)
        ).all()
        for job in stale:
            fail(session, job.id, _lost(job, f"worker {job.worker} stopped responding"))
        return len(stale)


def requeue_lost_jobs() -> int:
    """Enqueue again queued jobs the queue does not hold (Redis was down at their commit, or
    restarted empty); jobs younger than a heartbeat are left to their own enqueue."""
    cutoff = utcnow() - timedelta(seconds=get_settings().heartbeat_s)
    queue = get_queue()
    count = 0
    with session_scope() as session:
        for job in session.scalars(
            select(FineTuningJob)
            .where(FineTuningJob.status == JobStatus.QUEUED, FineTuningJob.created_at < cutoff)
            .with_for_update(skip_locked=True)
        ):
            if queue.holds(TRAINING_QUEUE, job.id):
                continue
            add_event(session, job.id, "not in the queue; queued again", level="warning")
            enqueue(session, job.id)
            count += 1
    return count


def recover_embedded() -> int:
    """At start-up of the embedded server: fail what the last process was running (it died
    with it), queue again what it had not started."""
    count = 0
    with session_scope() as session:
        for job in session.scalars(
            select(FineTuningJob).where(
                FineTuningJob.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
            )
        ):
            count += 1
            if job.status == JobStatus.RUNNING:
                fail(session, job.id, _lost(job, "the server stopped"))
                continue
            enqueue(session, job.id)
    return count


def _lost(job: FineTuningJob, why: str) -> str:
    where = job.phase if job.phase != Phase.TRAINING else f"training at step {job.step}"
    return (
        f"{why} during {where} (of {job.total_steps or '?'} steps); training does not resume: "
        "create a new job"
    )
