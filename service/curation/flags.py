"""The effective flag: a reviewer's decision where there is one, else RDS's flag.

Every reader of flags (the subset download, the risk view, a fine-tuning job) goes through
here, so a review changes each of them in the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, not_, or_, select
from sqlalchemy.orm import Session

from service.models import ReviewDecision, SampleReview, SampleScore


def review_join() -> ColumnElement[bool]:
    """The ON clause of ``SampleScore`` LEFT JOIN ``SampleReview``."""
    return and_(SampleReview.job_id == SampleScore.job_id, SampleReview.idx == SampleScore.idx)


def effectively_flagged() -> ColumnElement[bool]:
    """True where the sample is flagged after review (needs :func:`review_join`). Never
    NULL, so that its negation selects the unflagged: without a review the decision is NULL,
    and ``decision = 'flag'`` alone would be NULL too."""
    reviewed = SampleReview.decision.isnot(None)
    return or_(
        and_(reviewed, SampleReview.decision == ReviewDecision.FLAG),
        and_(not_(reviewed), SampleScore.flagged.is_(True)),
    )


def effective(rds_flagged: bool, decision: str | None) -> bool:
    return rds_flagged if decision is None else decision == ReviewDecision.FLAG


@dataclass(frozen=True)
class CurationCounts:
    total: int
    rds_flagged: int
    flagged: int
    reviewed: int
    decided_flag: int
    decided_keep: int
    to_flag: int  # RDS did not flag it; a reviewer did
    to_keep: int  # RDS flagged it; a reviewer kept it


def _count(condition: ColumnElement[bool]) -> Any:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def curation_counts(session: Session, job_id: str) -> CurationCounts:
    rds = SampleScore.flagged.is_(True)
    flag = SampleReview.decision == ReviewDecision.FLAG
    keep = SampleReview.decision == ReviewDecision.KEEP
    row = session.execute(
        select(
            func.count(SampleScore.idx),
            _count(rds),
            _count(effectively_flagged()),
            func.count(SampleReview.idx),
            _count(flag),
            _count(keep),
            _count(and_(flag, not_(rds))),
            _count(and_(keep, rds)),
        )
        .select_from(SampleScore)
        .outerjoin(SampleReview, review_join())
        .where(SampleScore.job_id == job_id)
    ).one()
    return CurationCounts(*(int(v) for v in row))


def snapshot(session: Session, job_id: str) -> dict[str, Any]:
    """What a fine-tuning job records at creation: the counts and the overrules of RDS's
    flags (indices each way), from which its worker rebuilds the effective flags."""
    counts = curation_counts(session, job_id)
    rows = session.execute(
        select(SampleReview.idx, SampleReview.decision, SampleScore.flagged)
        .join(SampleScore, review_join())
        .where(SampleReview.job_id == job_id)
        .order_by(SampleReview.idx)
    ).all()
    return {
        "scoring_job_id": job_id,
        **{k: v for k, v in asdict(counts).items() if k not in ("to_flag", "to_keep")},
        "to_flag": [i for i, d, rds in rows if d == ReviewDecision.FLAG and not rds],
        "to_keep": [i for i, d, rds in rows if d == ReviewDecision.KEEP and rds],
    }


def apply_snapshot(
    scores: Mapping[int, MutableMapping[str, Any]], recorded: Mapping[str, Any] | None
) -> None:
    """Sets each score's ``flagged`` to the effective flag a job recorded (in place); the
    RDS flag stays in ``rds_flagged`` where a review overruled it."""
    if not recorded:
        return
    for key, value in (("to_flag", True), ("to_keep", False)):
        for idx in recorded.get(key, ()):
            if idx in scores:
                scores[idx]["rds_flagged"] = scores[idx]["flagged"]
                scores[idx]["flagged"] = value
