"""Scoring job tasks, run by RQ workers or by the embedded in-process queue.

A job is split into shards; a shard is scored chunk by chunk, and each chunk's scores are
written in one transaction with idempotent inserts. A shard that runs again (after a crash, or
re-queued by the reaper) skips the samples that already have scores, so a resumed job ends with
exactly the scores of a clean run. The scoring itself is the engine's
(:func:`worker.scoring.engine.score_samples`): this module feeds it samples and stores results.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service.core import job_state
from service.core.config import get_settings
from service.core.db import after_commit, retry_transient, session_scope, utcnow
from service.core.events import add_event
from service.core.heartbeat import Heartbeat
from service.core.job_state import WORKER_NAME, JobCancelled
from service.core.queue import SCORING_QUEUE, dispatch, get_queue
from service.datasets.repository import load_samples
from service.models import Dataset, JobStatus, Role, SampleScore, ScoringJob, ScoringShard
from service.roles.service import prompts_of
from worker.encoding import ChatEncoder, EncodingConfig
from worker.packaged_models import BUNDLED_ALIAS, is_bundled
from worker.results import RunStats, SampleScores
from worker.scoring.backends import ScoreConfig, ScoringBackend, build_backend
from worker.scoring.engine import score_samples

log = logging.getLogger(__name__)

_backends: dict[tuple[Any, ...], ScoringBackend] = {}
_backend_lock = threading.Lock()


def shard_task_id(job_id: str, shard: int) -> str:
    """The queue's id for a shard's task: stable, so the sweeper can ask whether it is held."""
    return f"{job_id}-{shard}"


def enqueue_shard(session: Session, job_id: str, shard: int) -> None:
    """Enqueue after the surrounding transaction commits, never before."""
    task_id = shard_task_id(job_id, shard)
    after_commit(
        session, lambda: dispatch(SCORING_QUEUE, run_scoring_shard, job_id, shard, job_id=task_id)
    )


def backend_for(config: ScoreConfig) -> ScoringBackend:
    """Models load once per process and serve every later job with the same settings."""
    key = (config.model, config.backend, config.dtype, config.batch_size)
    with _backend_lock:
        if key not in _backends:
            log.info(
                "loading model %s (%s, %s)",
                config.model or BUNDLED_ALIAS,
                config.backend,
                config.dtype,
            )
            _backends[key] = build_backend(config, get_settings().vllm_engine_options)
        return _backends[key]


def close_backends() -> None:
    """Release the loaded backends; a worker calls it as it exits."""
    with _backend_lock:
        for backend in _backends.values():
            backend.close()
        _backends.clear()


def default_config() -> ScoreConfig:
    settings = get_settings()
    return ScoreConfig(
        model=settings.scoring_model, backend=settings.scoring_backend, dtype=settings.scoring_dtype
    )


def scoring_encoding(job: ScoringJob) -> EncodingConfig:
    """The truncation a job's samples are scored with; fine-tuning on its flags uses it too."""
    return EncodingConfig()


def _config(job: ScoringJob) -> ScoreConfig:
    return ScoreConfig(
        model=None if is_bundled(job.model) else job.model,
        backend=job.backend,
        dtype=job.dtype,
        batch_size=job.batch_size,
        margin=job.margin,
        compute_reference=job.compute_reference,
        encoding=scoring_encoding(job),
    )


def run_scoring_shard(job_id: str, shard_no: int) -> None:
    """Score one shard of a job; the entry point the queues call."""
    settings = get_settings()
    with session_scope() as session:
        config = _claim_shard(session, job_id, shard_no)
    if config is None:
        return
    heartbeat = Heartbeat(
        f"{job_id}-{shard_no}",
        settings.heartbeat_s,
        lambda: (
            update(ScoringShard)
            .where(ScoringShard.job_id == job_id, ScoringShard.shard == shard_no)
            .values(heartbeat_at=utcnow())
        ),
    )
    what = f"job {job_id} shard {shard_no}"
    try:
        with heartbeat:
            retry_transient(
                lambda: _score_shard(job_id, shard_no, config, settings.chunk_size),
                settings.outage_grace_s,
                what,
            )
    except JobCancelled:
        with session_scope() as session:
            _set_shard(session, job_id, shard_no, JobStatus.CANCELLED)
        return
    except Exception as exc:
        log.exception("job %s shard %s failed", job_id, shard_no)
        with session_scope() as session:
            _set_shard(session, job_id, shard_no, JobStatus.FAILED)
            job_state.fail(session, ScoringJob, job_id, f"{type(exc).__name__}: {exc}")
        raise
    retry_transient(lambda: _finish_shard(job_id, shard_no), settings.outage_grace_s, what)


def _finish_shard(job_id: str, shard_no: int) -> None:
    with session_scope() as session:
        _set_shard(session, job_id, shard_no, JobStatus.SUCCEEDED)
        add_event(session, job_id, f"shard {shard_no} finished", shard=shard_no)
        _finish_if_done(session, job_id)


def _claim_shard(session: Session, job_id: str, shard_no: int) -> ScoreConfig | None:
    """Mark the shard (and a queued job) running; None when there is nothing to run."""
    job = session.get(ScoringJob, job_id)
    shard = session.get(ScoringShard, (job_id, shard_no))
    if job is None or shard is None:
        log.warning("job %s shard %s no longer exists", job_id, shard_no)
        return None
    if JobStatus(job.status).finished or shard.status == JobStatus.SUCCEEDED:
        return None
    shard.status = JobStatus.RUNNING
    shard.attempts += 1
    shard.worker = WORKER_NAME
    shard.heartbeat_at = utcnow()
    if job.status == JobStatus.QUEUED:
        job.status = JobStatus.RUNNING
        job.started_at = utcnow()
        add_event(session, job.id, "job started", worker=WORKER_NAME)
    add_event(
        session,
        job.id,
        f"shard {shard_no} started",
        shard=shard_no,
        attempt=shard.attempts,
        worker=WORKER_NAME,
    )
    return _config(job)


def _set_shard(session: Session, job_id: str, shard_no: int, status: JobStatus) -> None:
    session.execute(
        update(ScoringShard)
        .where(ScoringShard.job_id == job_id, ScoringShard.shard == shard_no)
        .values(status=status)
    )


def _score_shard(job_id: str, shard_no: int, config: ScoreConfig, chunk_size: int) -> None:
    with session_scope() as session:
        job = session.get(ScoringJob, job_id)
        shard = session.get(ScoringShard, (job_id, shard_no))
        assert job is not None and shard is not None
        dataset = session.get(Dataset, job.dataset_id)
        assert dataset is not None
        role = session.get(Role, dataset.role_id)
        assert role is not None
        prompts = prompts_of(role)
        start, end = shard.start_idx, shard.end_idx
    backend = backend_for(config)
    encoder = ChatEncoder(backend.tokenizer, prompts, config.encoding)
    cursor = start - 1
    while True:
        with session_scope() as session:
            status = session.scalar(select(ScoringJob.status).where(ScoringJob.id == job_id))
            if status == JobStatus.CANCELLED:
                raise JobCancelled
            # Only this shard's not-yet-passed range: a normal run finds nothing here,
            # so the check costs nothing per chunk however many scores the job has.
            done = select(SampleScore.idx).where(
                SampleScore.job_id == job_id, SampleScore.idx > cursor, SampleScore.idx < end
            )
            # resume: skip what a crashed run wrote
            samples = load_samples(
                session, dataset, after=cursor, before=end, skip=done, limit=chunk_size
            )
        if not samples:
            return
        scored = score_samples(
            samples,
            encoder,
            backend.scorer,
            margin=config.margin,
            compute_reference=config.compute_reference,
            chunk_size=len(samples),
            checker=backend.checker,
            check_band=config.band,
        )
        _write_chunk(job_id, [s for _, s in scored])
        cursor = samples[-1].index


def _insert_ignore(session: Session) -> Any:
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def _write_chunk(job_id: str, scores: list[SampleScores]) -> None:
    """One transaction: the chunk's scores (insert-or-ignore), progress, heartbeat."""
    with session_scope() as session:
        insert = _insert_ignore(session)
        result = session.execute(
            insert(SampleScore)
            .values(
                [
                    {
                        "job_id": job_id,
                        "idx": s.index,
                        "flagged": s.flagged,
                        "scores": json.dumps(s.to_json()),
                        "delta": s.finite_delta,
                    }
                    for s in scores
                ]
            )
            .on_conflict_do_nothing(index_elements=["job_id", "idx"])
            .returning(SampleScore.idx)
        )
        # Rows a crashed earlier run already wrote are skipped, and not counted twice.
        inserted = len(result.all())
        session.execute(
            update(ScoringJob)
            .where(ScoringJob.id == job_id)
            .values(processed=ScoringJob.processed + inserted)
        )


def _finish_if_done(session: Session, job_id: str) -> None:
    """Succeed the job once every shard has; the row lock serialises concurrent shards."""
    job = session.get(ScoringJob, job_id, with_for_update=True)
    if job is None or JobStatus(job.status).finished:
        return
    pending = session.scalar(
        select(func.count())
        .select_from(ScoringShard)
        .where(ScoringShard.job_id == job_id, ScoringShard.status != JobStatus.SUCCEEDED)
    )
    if pending:
        return
    stats = RunStats()
    for text in session.scalars(
        select(SampleScore.scores).where(SampleScore.job_id == job_id).order_by(SampleScore.idx)
    ):
        stats.add_json(json.loads(text))
    summary = stats.to_json()
    job.processed = stats.num_samples
    job.result = {
        "num_samples": summary["num_samples"],
        "num_flagged": summary["num_flagged"],
        "flagged_fraction": summary["flagged_fraction"],
        "num_truncated": summary["num_truncated"],
        "quantiles": summary["quantiles"],
    }
    job.status = JobStatus.SUCCEEDED
    job.finished_at = utcnow()
    add_event(session, job_id, "job succeeded", **job.result)


def _live_shards(session: Session, *where: Any, lock: bool = False) -> list[ScoringShard]:
    """Shards of jobs still queued or running, matching ``where``."""
    stmt = (
        select(ScoringShard)
        .join(ScoringJob, ScoringJob.id == ScoringShard.job_id)
        .where(ScoringJob.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]), *where)
    )
    if lock:
        stmt = stmt.with_for_update(of=ScoringShard, skip_locked=True)
    return list(session.scalars(stmt).all())


def reap_stale_shards() -> int:
    """Re-queue (or fail) shards whose worker stopped sending heartbeats."""
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.stale_after_s)
    count = 0
    with session_scope() as session:
        stale = _live_shards(
            session,
            ScoringShard.status == JobStatus.RUNNING,
            ScoringShard.heartbeat_at < cutoff,
            lock=True,
        )
        for shard in stale:
            count += 1
            lost = f"worker {shard.worker} stopped responding"
            if shard.attempts >= settings.max_attempts:
                shard.status = JobStatus.FAILED
                job_state.fail(
                    session,
                    ScoringJob,
                    shard.job_id,
                    f"{lost} during {shard.attempts} attempts of shard {shard.shard}",
                )
                continue
            shard.status = JobStatus.QUEUED
            shard.heartbeat_at = utcnow()  # a queued shard's: when it was queued
            add_event(
                session,
                shard.job_id,
                f"{lost}; shard {shard.shard} re-queued",
                level="warning",
                shard=shard.shard,
                attempts=shard.attempts,
            )
            enqueue_shard(session, shard.job_id, shard.shard)
    return count


def requeue_lost_shards() -> int:
    """Enqueue again the queued shards whose task the queue does not hold: Redis was
    unreachable when they committed, or restarted without its data. Shards queued less than
    a heartbeat ago are left to the enqueue that follows their commit."""
    cutoff = utcnow() - timedelta(seconds=get_settings().heartbeat_s)
    queue = get_queue()
    count = 0
    with session_scope() as session:
        for shard in _live_shards(session, ScoringShard.status == JobStatus.QUEUED, lock=True):
            job = session.get(ScoringJob, shard.job_id)
            queued_at = shard.heartbeat_at or (job.created_at if job else None)
            if queued_at is not None and queued_at > cutoff:
                continue
            if queue.holds(SCORING_QUEUE, shard_task_id(shard.job_id, shard.shard)):
                continue
            shard.heartbeat_at = utcnow()
            add_event(
                session,
                shard.job_id,
                f"shard {shard.shard} was not in the queue; queued again",
                level="warning",
                shard=shard.shard,
            )
            enqueue_shard(session, shard.job_id, shard.shard)
            count += 1
    return count


def recover_embedded() -> int:
    """Embedded mode starts with no job running: re-queue what the last process left."""
    count = 0
    with session_scope() as session:
        live = [JobStatus.QUEUED, JobStatus.RUNNING]
        for shard in _live_shards(session, ScoringShard.status.in_(live)):
            shard.status = JobStatus.QUEUED
            enqueue_shard(session, shard.job_id, shard.shard)
            count += 1
    return count
