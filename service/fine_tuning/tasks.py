"""Fine-tuning job tasks, run by the training queue's RQ worker or the embedded queue.

A task claims the job, reads its rows once into plain data (:class:`trainer.run_spec.RunInputs`)
and hands them to the database-free pipeline (:func:`trainer.pipeline.run_fine_tuning`), whose
callbacks record phases, steps and evaluation progress as job events and ask whether the user
cancelled. Each optimizer step updates the job's progress.

A job resumes: a worker that dies mid-job stops heartbeating, and the reaper
(:func:`reap_stale_jobs`, run by every ``sarft worker`` and by the embedded server) queues it
again, up to ``SARFT_MAX_ATTEMPTS`` runs; the next worker continues from the newest checkpoint
(:mod:`trainer.checkpoints`) with the base evaluation it already has. The database writes of a
run wait out a database outage (``SARFT_OUTAGE_GRACE_S``) instead of failing it. An error in
the run itself, or a cancellation, ends the job failed or cancelled with the reason. Nothing
stays ``running``.
"""

from __future__ import annotations

import gc
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from service.core import job_state
from service.core.config import get_settings
from service.core.db import after_commit, retry_transient, session_scope, utcnow
from service.core.events import add_event
from service.core.heartbeat import Heartbeat
from service.core.ids import new_id
from service.core.job_state import WORKER_NAME
from service.core.queue import TRAINING_QUEUE, dispatch, get_queue
from service.fine_tuning.inputs import InvalidInputs, load_inputs
from service.fine_tuning.storage import artifact_dir
from service.models import (
    FineTuningCheckpoint,
    FineTuningJob,
    JobStatus,
)
from trainer.run_spec import (
    CheckpointSettings,
    EvalResources,
    Phase,
    RunCancelled,
    RunHooks,
)
from worker.packaged_models import base_model_id

T = TypeVar("T")

log = logging.getLogger(__name__)


def enqueue(session: Session, job_id: str) -> None:
    """Enqueue after the surrounding transaction commits, never before."""
    after_commit(
        session, lambda: dispatch(TRAINING_QUEUE, run_fine_tuning_job, job_id, job_id=job_id)
    )


def run_fine_tuning_job(job_id: str) -> None:
    """The entry point the queues call: claim the job, then run it here, or in
    ``SARFT_TRAINING_PROCESSES`` data-parallel processes (:mod:`service.fine_tuning.launch`)
    while this one keeps the heartbeat."""
    settings = get_settings()
    with session_scope() as session:
        attempt = _claim(session, job_id)
    if attempt is None:
        return
    beat = Heartbeat(
        job_id,
        settings.heartbeat_s,
        lambda: (
            update(FineTuningJob).where(FineTuningJob.id == job_id).values(heartbeat_at=utcnow())
        ),
    )
    with beat:
        if settings.training_processes > 1:
            _run_processes(job_id, attempt, settings)
            return
        try:
            run_attempt(job_id, attempt)
        except RunCancelled:
            return  # recorded by the user's cancel; the files are gone


def run_attempt(job_id: str, attempt: int, accelerator: Any | None = None) -> None:
    """Run a claimed job (on the main process of a data-parallel run: with its accelerator)
    and record how it ended."""
    # Imported here: the API imports this module to enqueue, and must not load torch.
    from trainer.pipeline import run_fine_tuning

    settings = get_settings()
    resources = EvalResources(settings.eval_set_paths, settings.judge_api_key)
    out_dir = artifact_dir(job_id)
    try:
        inputs = _durable(lambda: load_inputs(job_id), "reading the job's inputs")
        result = run_fine_tuning(
            inputs,
            out_dir,
            resources=resources,
            hooks=_hooks(job_id),
            checkpoint_settings=checkpoint_settings(),
            # A later attempt continues from what the lost one left in its directory.
            resume=attempt > 1,
            accelerator=accelerator,
            vllm_options=settings.vllm_engine_options,
        )
    except RunCancelled:
        log.info("fine-tuning job %s cancelled", job_id)
        shutil.rmtree(out_dir, ignore_errors=True)  # partial files serve nobody
        raise
    except Exception as exc:
        log.exception("fine-tuning job %s failed", job_id)
        code = "invalid_inputs" if isinstance(exc, InvalidInputs) else "training_error"
        with session_scope() as session:
            fail(session, job_id, f"{type(exc).__name__}: {exc}", code)
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        gc.collect()
    _durable(lambda: _publish(job_id, result), "recording the result")


def checkpoint_settings() -> CheckpointSettings:
    settings = get_settings()
    return CheckpointSettings(
        every=settings.checkpoint_every or None, keep=settings.checkpoint_keep
    )


def _run_processes(job_id: str, attempt: int, settings: Any) -> None:
    """Start the job's data-parallel processes and wait for them; fail the job if they end
    without recording an outcome (a crash of a process, a kill by the launcher)."""
    module = ["-m", "service.fine_tuning.launch", job_id, str(attempt)]
    n = str(settings.training_processes)
    if settings.accelerate_config is not None:
        # accelerate's own config: DDP, FSDP or DeepSpeed ZeRO, mixed precision, machines.
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(settings.accelerate_config), "--num_processes", n, *module]  # fmt: skip
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", n, *module]  # fmt: skip
    log.info("fine-tuning job %s: %s", job_id, " ".join(command))
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        log.error("fine-tuning job %s processes exited %s:\n%s", job_id, done.returncode,
                  done.stdout[-20000:])  # fmt: skip
    with session_scope() as session:
        status = session.scalar(select(FineTuningJob.status).where(FineTuningJob.id == job_id))
        if status == JobStatus.RUNNING:
            tail = done.stdout.strip().splitlines()[-1:] or ["no output"]
            fail(
                session,
                job_id,
                f"the {n} training processes exited with code {done.returncode}: {tail[0]}",
                "training_error",
            )


def _durable(work: Callable[[], T], what: str) -> T:
    """``work`` (its own transactions, safe to repeat) waiting out a database outage."""
    return retry_transient(work, get_settings().outage_grace_s, what)


def _publish(job_id: str, result: dict[str, Any]) -> None:
    with session_scope() as session:
        _succeed(session, job_id, result)


def _claim(session: Session, job_id: str) -> int | None:
    """Mark a queued job running on this worker: its attempt number, or None when there is
    nothing to run."""
    job = session.get(FineTuningJob, job_id, with_for_update=True)
    if job is None:
        log.warning("fine-tuning job %s no longer exists", job_id)
        return None
    if job.status != JobStatus.QUEUED:
        return None  # cancelled while queued, or already taken
    job.status, job.phase = JobStatus.RUNNING, Phase.VALIDATING_FILES
    job.attempts += 1
    job.worker = WORKER_NAME
    job.heartbeat_at = utcnow()
    job.started_at = job.started_at or job.heartbeat_at
    job.estimated_finish = None
    message = "job started" if job.attempts == 1 else "job resumed"
    add_event(session, job_id, message, worker=WORKER_NAME, attempt=job.attempts)
    return job.attempts


def _succeed(session: Session, job_id: str, result: dict[str, Any]) -> None:
    job = session.get(FineTuningJob, job_id, with_for_update=True)
    if job is None or job.status != JobStatus.RUNNING:
        return  # cancelled at the last moment: the artifacts stay unpublished
    job.status, job.phase = JobStatus.SUCCEEDED, Phase.DONE
    job.result = result
    job.finished_at = utcnow()
    job.estimated_finish = None
    job.fine_tuned_model = fine_tuned_model_name(job)
    headline = {k: result[k] for k in ("steps", "final", "evaluation")}
    add_event(session, job_id, "job succeeded", **headline)


def fine_tuned_model_name(job: FineTuningJob) -> str:
    """A stable name for the trained model, as OpenAI's ``ft:<base>:<suffix>:<id>``."""
    parts = ["ft", base_model_id(job.model), *([job.suffix] if job.suffix else []), job.id]
    return ":".join(parts)


def fail(session: Session, job_id: str, error: str, code: str) -> None:
    # Locked before reading the phase the event records, as job_state.fail locks it again.
    job = session.get(FineTuningJob, job_id, with_for_update=True)
    phase = None if job is None else job.phase
    job_state.fail(session, FineTuningJob, job_id, error, code, phase=phase)


# --- the pipeline's callbacks: events, progress, cancellation -----------------------------------


def _hooks(job_id: str) -> RunHooks:
    """Each callback's writes are one transaction, repeated through a database outage: a
    repeat after a commit whose answer was lost can at worst duplicate an event."""
    step_seconds: list[float] = []  # this attempt's steps, for the estimated finish

    def cancelled() -> bool:
        def read() -> str | None:
            with session_scope() as session:
                return session.scalar(
                    select(FineTuningJob.status).where(FineTuningJob.id == job_id)
                )

        return _durable(read, "checking for a cancel") != JobStatus.RUNNING

    def on_phase(phase: Phase, message: str, data: dict[str, Any]) -> None:
        def write() -> None:
            with session_scope() as session:
                session.execute(
                    update(FineTuningJob).where(FineTuningJob.id == job_id).values(phase=phase)
                )
                add_event(session, job_id, message, phase=phase.value, **data)

        _durable(write, "recording a phase")

    def on_step(metrics: dict[str, float]) -> None:
        step, total = int(metrics["step"]), int(metrics["total_steps"])
        step_seconds.append(metrics["tokens"] / max(metrics["tokens_per_s"], 1e-9))
        mean = sum(step_seconds) / len(step_seconds)
        # The end of training; the tuned model's evaluation comes after it.
        finish = utcnow() + timedelta(seconds=mean * (total - step))
        data: dict[str, Any] = {k: round(float(v), 6) for k, v in metrics.items() if k != "step"}

        def write() -> None:
            with session_scope() as session:
                session.execute(
                    update(FineTuningJob)
                    .where(FineTuningJob.id == job_id)
                    .values(
                        step=step,
                        total_steps=total,
                        heartbeat_at=utcnow(),
                        estimated_finish=finish,
                        trained_tokens=int(metrics["trained_tokens"]),
                    )
                )
                add_event(session, job_id, f"step {step}/{total}", step=step, **data)

        _durable(write, "recording a step")

    def on_checkpoint(
        step: int, metrics: dict[str, float], archive: Path, deleted: list[int]
    ) -> None:
        relative = str(archive.relative_to(artifact_dir(job_id)))
        kept = {k: round(float(v), 6) for k, v in metrics.items() if k != "step"}

        def write() -> None:
            with session_scope() as session:
                # A step redone after a resume replaces its row; pruned steps lose theirs.
                session.execute(
                    delete(FineTuningCheckpoint).where(
                        FineTuningCheckpoint.job_id == job_id,
                        FineTuningCheckpoint.step_number.in_([step, *deleted]),
                    )
                )
                session.add(
                    FineTuningCheckpoint(
                        id=new_id("ftckpt"),
                        job_id=job_id,
                        step_number=step,
                        metrics=kept,
                        archive=relative,
                    )
                )
                add_event(session, job_id, f"checkpoint at step {step}", step=step, metrics=kept)

        _durable(write, "recording a checkpoint")

    def on_generated(which: str, stage: str, done: int, total: int) -> None:
        if done == total:  # one event per prompt set, not per batch

            def write() -> None:
                with session_scope() as session:
                    add_event(session, job_id, f"{which} model: {stage} generated", done=done)

            _durable(write, "recording evaluation progress")

    return RunHooks(
        on_phase=on_phase,
        on_step=on_step,
        on_generated=on_generated,
        on_checkpoint=on_checkpoint,
        should_stop=cancelled,
    )


# --- lost workers ------------------------------------------------------------------------------


def reap_stale_jobs() -> int:
    """Queue again (to resume) running jobs whose worker stopped heartbeating (killed, out of
    memory, host lost); fail them once they have used ``SARFT_MAX_ATTEMPTS`` runs."""
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.stale_after_s)
    with session_scope() as session:
        stale = session.scalars(
            select(FineTuningJob)
            .where(FineTuningJob.status == JobStatus.RUNNING, FineTuningJob.heartbeat_at < cutoff)
            .with_for_update(skip_locked=True)
        ).all()
        for job in stale:
            _lost_worker(session, job, f"worker {job.worker} stopped responding", settings)
        return len(stale)


def _lost_worker(session: Session, job: FineTuningJob, why: str, settings: Any) -> None:
    if job.attempts >= settings.max_attempts:
        fail(session, job.id, _lost(job, why), "worker_lost")
        return
    message = f"{_where(job, why)}; queued again to resume from its newest checkpoint"
    job.status, job.phase = JobStatus.QUEUED, Phase.QUEUED
    job.estimated_finish = None
    add_event(session, job.id, message, level="warning", attempts=job.attempts)
    enqueue(session, job.id)


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
    """At start-up of the embedded server: resume what the last process was running (it died
    with it), queue again what it had not started."""
    settings = get_settings()
    count = 0
    with session_scope() as session:
        for job in session.scalars(
            select(FineTuningJob).where(
                FineTuningJob.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
            )
        ):
            count += 1
            if job.status == JobStatus.RUNNING:
                _lost_worker(session, job, "the server stopped", settings)
                continue
            enqueue(session, job.id)
    return count


def _where(job: FineTuningJob, why: str) -> str:
    where = job.phase if job.phase != Phase.TRAINING else f"training at step {job.step}"
    return f"{why} during {where} (of {job.total_steps or '?'} steps)"


def _lost(job: FineTuningJob, why: str) -> str:
    return f"{_where(job, why)}, after {job.attempts} attempts; create a new job"
