"""Scoring jobs: creation (split into shards), cancel, events, and subset downloads."""

from __future__ import annotations

import json
from collections.abc import Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core import job_state
from service.core.config import get_settings
from service.core.db import session_scope
from service.core.errors import APIError, Conflict
from service.core.events import add_event, timestamp
from service.core.ids import new_id
from service.core.queue import require_queue
from service.core.scoping import get_owned
from service.curation.flags import effectively_flagged, review_join
from service.datasets import service as datasets
from service.models import (
    DatasetSample,
    JobStatus,
    SampleReview,
    SampleScore,
    ScoringJob,
    ScoringShard,
)
from service.scoring_jobs.schemas import Progress, ScoringJobCreate, ScoringJobOut
from service.scoring_jobs.tasks import enqueue_shard

PAGE = 1000


def to_out(job: ScoringJob) -> ScoringJobOut:
    return ScoringJobOut(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        dataset_id=job.dataset_id,
        status=JobStatus(job.status).value,
        model=job.model,
        backend=job.backend,
        dtype=job.dtype,
        margin=job.margin,
        compute_reference=job.compute_reference,
        batch_size=job.batch_size,
        progress=Progress(processed=job.processed, total=job.total),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
        error=job.error,
        result=job.result,
    )


def create(session: Session, tenant_id: str, body: ScoringJobCreate) -> ScoringJob:
    settings = get_settings()
    require_queue()
    dataset = datasets.get(session, tenant_id, body.dataset_id)
    if body.model is not None and body.model not in settings.allowed_models:
        raise APIError(
            f"model {body.model!r} is not served here; allowed: {sorted(settings.allowed_models)}",
            param="model",
        )
    job = ScoringJob(
        id=new_id("scorejob"),
        tenant_id=tenant_id,
        dataset_id=dataset.id,
        status=JobStatus.QUEUED,
        model=body.model or settings.scoring_model,
        backend=body.backend or settings.scoring_backend,
        dtype=settings.scoring_dtype,
        margin=body.margin,
        compute_reference=body.compute_reference,
        batch_size=body.batch_size,
        total=dataset.num_samples,
        processed=0,
    )
    session.add(job)
    size = max(1, settings.shard_size)
    for shard, start in enumerate(range(0, dataset.num_samples, size)):
        end = min(start + size, dataset.num_samples)
        session.add(ScoringShard(job_id=job.id, shard=shard, start_idx=start, end_idx=end))
        enqueue_shard(session, job.id, shard)
    add_event(session, job.id, "job created", total=dataset.num_samples)
    session.flush()
    return job


def get(session: Session, tenant_id: str, job_id: str) -> ScoringJob:
    return get_owned(session, ScoringJob, job_id, tenant_id, what="scoring job", param="job_id")


def cancel(session: Session, tenant_id: str, job_id: str) -> ScoringJob:
    return job_state.cancel(session, get(session, tenant_id, job_id))


def stream_subset(job_id: str, dataset_id: str, flagged_only: bool) -> Iterator[bytes]:
    """JSONL in upload order: each record as uploaded, plus its ``scores`` (with RDS's flag),
    and its ``review`` where a reviewer decided (the subset is the effectively flagged rows).

    Pages by sample index with its own sessions, so memory stays flat and no
    transaction is held open while the client reads.
    """
    last = -1
    while True:
        with session_scope() as session:
            stmt = (
                select(
                    DatasetSample.idx,
                    DatasetSample.record,
                    SampleScore.scores,
                    SampleReview.decision,
                    SampleReview.note,
                    SampleReview.reviewer,
                )
                .join(
                    SampleScore,
                    (SampleScore.idx == DatasetSample.idx) & (SampleScore.job_id == job_id),
                )
                .outerjoin(SampleReview, review_join())
                .where(DatasetSample.dataset_id == dataset_id, DatasetSample.idx > last)
                .order_by(DatasetSample.idx)
                .limit(PAGE)
            )
            if flagged_only:
                stmt = stmt.where(effectively_flagged())
            rows = session.execute(stmt).all()
        if not rows:
            return
        lines = []
        for _idx, record, scores, decision, note, reviewer in rows:
            line = json.loads(record)
            line["scores"] = json.loads(scores)
            if decision is not None:
                # The scores keep RDS's flag; a review (the effective flag) rides beside it.
                line["review"] = {"decision": decision, "note": note, "reviewer": reviewer}
            lines.append(json.dumps(line, ensure_ascii=False) + "\n")
        yield "".join(lines).encode()
        last = rows[-1][0]


def check_downloadable(job: ScoringJob) -> None:
    if job.status != JobStatus.SUCCEEDED:
        raise Conflict(f"the job is {job.status}; results are ready once it has succeeded")


def load_scores(session: Session, job_id: str) -> dict[int, dict[str, object]]:
    return {
        idx: json.loads(text)
        for idx, text in session.execute(
            select(SampleScore.idx, SampleScore.scores).where(SampleScore.job_id == job_id)
        )
    }
