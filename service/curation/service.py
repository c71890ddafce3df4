"""Reviews of a scoring job's samples: listing with scores, single and bulk decisions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, not_, or_, select
from sqlalchemy.orm import Session

from service.core.auth import Caller
from service.core.db import utcnow
from service.core.errors import APIError, Conflict, NotFound
from service.core.events import add_event, timestamp
from service.curation.flags import (
    CurationCounts,
    curation_counts,
    effective,
    effectively_flagged,
    review_join,
)
from service.curation.schemas import (
    INDEX_MAX,
    BulkReviewIn,
    CurationOut,
    Decision,
    Decisions,
    MessageOut,
    Overrides,
    ReviewIn,
    ReviewOut,
    SampleOrder,
    SampleOut,
)
from service.models import Dataset, DatasetSample, JobStatus, SampleReview, SampleScore, ScoringJob
from worker.formats import DatasetFormat, sample_from_record


@dataclass(frozen=True)
class SampleFilter:
    flagged: bool | None = None
    rds_flagged: bool | None = None
    reviewed: bool | None = None
    decision: Decision | None = None
    q: str | None = None


def curation_out(job_id: str, counts: CurationCounts, updated: int | None = None) -> CurationOut:
    return CurationOut(
        job_id=job_id,
        total=counts.total,
        rds_flagged=counts.rds_flagged,
        flagged=counts.flagged,
        reviewed=counts.reviewed,
        decisions=Decisions(flag=counts.decided_flag, keep=counts.decided_keep),
        overrides=Overrides(to_flag=counts.to_flag, to_keep=counts.to_keep),
        updated=updated,
    )


def _rows(job: ScoringJob) -> Select[SampleScore, int, str, SampleReview]:
    return (
        select(SampleScore, DatasetSample.line, DatasetSample.record, SampleReview)
        .join(
            DatasetSample,
            and_(DatasetSample.dataset_id == job.dataset_id, DatasetSample.idx == SampleScore.idx),
        )
        .outerjoin(SampleReview, review_join())
        .where(SampleScore.job_id == job.id)
    )


def _sample_out(
    fmt: DatasetFormat, score: SampleScore, line: int, record: str, review: SampleReview | None
) -> SampleOut:
    sample = sample_from_record(json.loads(record), fmt, score.idx, line)
    decision = None if review is None else review.decision
    return SampleOut(
        index=score.idx,
        line=line,
        messages=[MessageOut(role=m.role, content=m.content) for m in sample.messages],
        scores=json.loads(score.scores),
        difference=score.delta,
        rds_flagged=score.flagged,
        flagged=effective(score.flagged, decision),
        review=None
        if review is None
        else ReviewOut(
            decision=review.decision,  # type: ignore[arg-type]
            note=review.note,
            reviewer=review.reviewer,
            reviewed_at=timestamp(review.reviewed_at) or 0,
        ),
    )


def _conditions(where: SampleFilter) -> list[ColumnElement[bool]]:
    out: list[ColumnElement[bool]] = []
    if where.flagged is not None:
        out.append(effectively_flagged() if where.flagged else not_(effectively_flagged()))
    if where.rds_flagged is not None:
        out.append(SampleScore.flagged.is_(where.rds_flagged))
    if where.reviewed is not None:
        out.append(SampleReview.idx.isnot(None) if where.reviewed else SampleReview.idx.is_(None))
    if where.decision is not None:
        out.append(SampleReview.decision == where.decision)
    if where.q:
        # The record is the JSON text as uploaded; LIKE's own wildcards are matched literally.
        pattern = where.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        out.append(DatasetSample.record.ilike(f"%{pattern}%", escape="\\"))
    return out


def _after(session: Session, job: ScoringJob, order: SampleOrder, after: str) -> Any:
    """The keyset condition for the page after sample ``after`` in ``order``."""
    if not after.isdigit():  # the route's pattern admits digits only
        raise APIError(
            "after must be a sample index (a number) from the previous page", param="after"
        )
    idx = min(int(after), INDEX_MAX)  # no sample lies beyond: an empty page
    if order == "index":
        return SampleScore.idx > idx
    anchor = session.scalar(
        select(SampleScore.delta).where(SampleScore.job_id == job.id, SampleScore.idx == idx)
    )
    if anchor is None:
        # Samples without a finite difference come last, by index.
        return and_(SampleScore.delta.is_(None), SampleScore.idx > idx)
    beyond = (
        SampleScore.delta < anchor if order == "difference_desc" else SampleScore.delta > anchor
    )
    return or_(
        beyond,
        and_(SampleScore.delta == anchor, SampleScore.idx > idx),
        SampleScore.delta.is_(None),
    )


def list_samples(
    session: Session,
    job: ScoringJob,
    where: SampleFilter,
    order: SampleOrder,
    limit: int,
    after: str | None,
) -> tuple[list[SampleOut], bool]:
    stmt = _rows(job).where(*_conditions(where))
    if after is not None:
        stmt = stmt.where(_after(session, job, order, after))
    if order == "index":
        stmt = stmt.order_by(SampleScore.idx)
    else:
        delta = SampleScore.delta.desc() if order == "difference_desc" else SampleScore.delta
        stmt = stmt.order_by(SampleScore.delta.is_(None), delta, SampleScore.idx)
    rows = session.execute(stmt.limit(limit + 1)).all()
    fmt = _format(session, job)
    return [_sample_out(fmt, r[0], r[1], r[2], r[3]) for r in rows[:limit]], len(rows) > limit


def _format(session: Session, job: ScoringJob) -> DatasetFormat:
    dataset = session.get(Dataset, job.dataset_id)
    assert dataset is not None  # a dataset's scoring jobs are deleted with it
    return DatasetFormat(dataset.format)


def get_sample(session: Session, job: ScoringJob, index: int) -> SampleOut:
    row = session.execute(_rows(job).where(SampleScore.idx == index)).first()
    if row is None:
        raise NotFound(f"scoring job {job.id} has no sample {index}", param="index")
    return _sample_out(_format(session, job), row[0], row[1], row[2], row[3])


def check_reviewable(job: ScoringJob) -> None:
    if job.status != JobStatus.SUCCEEDED:
        raise Conflict(
            f"the job is {job.status}; its samples can be reviewed once it has succeeded"
        )


def _apply(
    session: Session, job: ScoringJob, indices: Sequence[int], body: ReviewIn, caller: Caller
) -> int:
    """Writes one decision on every sample of ``indices`` and one audit event; returns how
    many samples changed. The samples' score rows are locked first (in index order), so
    concurrent reviews of a sample serialise instead of colliding on the insert."""
    wanted = sorted(set(indices))
    found = session.scalars(
        select(SampleScore.idx)
        .where(SampleScore.job_id == job.id, SampleScore.idx.in_(wanted))
        .order_by(SampleScore.idx)
        .with_for_update()
    ).all()
    if missing := sorted(set(wanted) - set(found)):
        raise NotFound(f"scoring job {job.id} has no sample {missing[0]}", param="index")
    existing = {
        r.idx: r
        for r in session.scalars(
            select(SampleReview).where(SampleReview.job_id == job.id, SampleReview.idx.in_(wanted))
        )
    }
    now = utcnow()
    previous: dict[str, str | None] = {}
    for idx in wanted:
        review = existing.get(idx)
        before = None if review is None else review.decision
        if body.decision is None:
            if review is not None:
                session.delete(review)
                previous[str(idx)] = before
            continue
        if review is None:
            session.add(
                SampleReview(
                    job_id=job.id,
                    idx=idx,
                    decision=body.decision,
                    note=body.note,
                    reviewer=caller.name,
                    reviewed_at=now,
                )
            )
        elif (review.decision, review.note) != (body.decision, body.note):
            review.decision, review.note = body.decision, body.note
            review.reviewer, review.reviewed_at = caller.name, now
        else:
            continue
        previous[str(idx)] = before
    if previous:
        what = f"sample {wanted[0]}" if len(wanted) == 1 else f"{len(previous)} samples"
        add_event(
            session, job.id, f"{what} reviewed: {body.decision or 'cleared'}",
            indices=[int(i) for i in previous], decision=body.decision, previous=previous,
            note=body.note, reviewer=caller.name,
        )  # fmt: skip
    session.flush()
    return len(previous)


def review_one(
    session: Session, job: ScoringJob, index: int, body: ReviewIn, caller: Caller
) -> SampleOut:
    check_reviewable(job)  # the route bounds index to 0..INDEX_MAX
    _apply(session, job, [index], body, caller)
    return get_sample(session, job, index)


def review_many(
    session: Session, job: ScoringJob, body: BulkReviewIn, caller: Caller
) -> CurationOut:
    check_reviewable(job)
    changed = _apply(session, job, body.indices, body, caller)
    return curation_out(job.id, curation_counts(session, job.id), updated=changed)
