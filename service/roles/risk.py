"""Per-role risk: each role's latest succeeded scoring job, summarised from its stored scores.

For every role of a page: the flagged fraction with its Wilson 95% interval, the distribution
of ``s_unsafe - s_role`` (the ``delta`` each sample's scores carry) and the flagged samples
with the largest difference. One query finds the latest succeeded job of every role on the
page; each job's scores are then read in index pages, so memory holds one float per sample
and a few candidates, never the stored JSON of a whole job.
"""

from __future__ import annotations

import heapq
import json
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.core.events import timestamp
from service.core.pagination import ListParams, ListResponse, paginate
from service.curation.flags import effectively_flagged, review_join
from service.models import (
    Dataset,
    DatasetSample,
    JobStatus,
    Role,
    SampleReview,
    SampleScore,
    ScoringJob,
)
from service.roles.schemas import DifferenceStats, FlaggedSample, Histogram, RoleRisk
from trainer.intervals import wilson_interval
from worker.formats import DatasetFormat, response_text, sample_from_record

TEXT_CHARS = 280
SCORES_PAGE = 5000


def histogram(values: Sequence[float], bins: int) -> Histogram:
    """Equal-width bins over [min, max], with numpy.histogram's edges and bin rule."""
    lo, hi = min(values), max(values)
    if lo == hi:  # one value: a unit-wide range around it, as numpy does
        lo, hi = lo - 0.5, hi + 0.5
    step = (hi - lo) / bins
    edges = [lo + i * step for i in range(bins)] + [hi]
    counts = [0] * bins
    for value in values:
        counts[min(bisect_right(edges, value) - 1, bins - 1)] += 1
    return Histogram(edges=edges, counts=counts)


def summarize(values: Sequence[float], bins: int) -> DifferenceStats | None:
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    median = ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return DifferenceStats(
        min=ordered[0],
        max=ordered[-1],
        mean=math.fsum(ordered) / n,
        median=median,
        histogram=histogram(ordered, bins),
    )


def shorten(text: str, limit: int = TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


class LatestJob(NamedTuple):
    role_id: str
    job_id: str
    dataset_id: str
    format: str
    model: str | None
    margin: float
    finished_at: datetime | None


def latest_succeeded_jobs(
    session: Session, tenant_id: str, role_ids: Sequence[str]
) -> dict[str, LatestJob]:
    """The most recently finished succeeded scoring job of each role, in one query."""
    if not role_ids:
        return {}
    finished = func.coalesce(ScoringJob.finished_at, ScoringJob.created_at)
    ranked = (
        select(
            Dataset.role_id,
            ScoringJob.id.label("job_id"),
            ScoringJob.dataset_id,
            Dataset.format,
            ScoringJob.model,
            ScoringJob.margin,
            ScoringJob.finished_at,
            func.row_number()
            .over(
                partition_by=Dataset.role_id,
                order_by=(finished.desc(), ScoringJob.id.desc()),
            )
            .label("rank"),
        )
        .join(Dataset, Dataset.id == ScoringJob.dataset_id)
        .where(
            ScoringJob.tenant_id == tenant_id,
            ScoringJob.status == JobStatus.SUCCEEDED,
            Dataset.role_id.in_(role_ids),
        )
        .subquery()
    )
    columns = [ranked.c[name] for name in LatestJob._fields]
    rows = session.execute(select(*columns).where(ranked.c.rank == 1))
    return {row.role_id: LatestJob(*row) for row in rows}


@dataclass
class _ScoreScan:
    """What one pass over a job's scores keeps: counts, the differences, the top candidates."""

    keep: int
    num_samples: int = 0
    num_flagged: int = 0
    differences: list[float] = field(default_factory=list)
    # A min-heap of (difference, -index): the smallest kept candidate is the one to replace,
    # and among equal differences the earlier sample wins.
    top: list[tuple[float, int]] = field(default_factory=list)

    def add(self, idx: int, flagged: bool, difference: float) -> None:
        self.num_samples += 1
        self.num_flagged += flagged
        # A non-finite mean log-probability has no place in a histogram or a JSON answer.
        if not math.isfinite(difference):
            return
        self.differences.append(difference)
        if flagged and self.keep:
            item = (difference, -idx)
            if len(self.top) < self.keep:
                heapq.heappush(self.top, item)
            elif item > self.top[0]:
                heapq.heapreplace(self.top, item)

    def most_flagged(self) -> list[tuple[float, int]]:
        """(difference, index) pairs, the largest difference first."""
        return [(d, -neg) for d, neg in sorted(self.top, reverse=True)]


def scan_scores(session: Session, job_id: str, keep: int) -> _ScoreScan:
    # Pages by index with keyset queries, as the subset download does: a read session runs in
    # autocommit, where a server-side cursor cannot stay open across a whole job.
    scan = _ScoreScan(keep=keep)
    last = -1
    while True:
        # The effective flag: a reviewer's decision overrules RDS's.
        rows = session.execute(
            select(SampleScore.idx, effectively_flagged(), SampleScore.delta)
            .outerjoin(SampleReview, review_join())
            .where(SampleScore.job_id == job_id, SampleScore.idx > last)
            .order_by(SampleScore.idx)
            .limit(SCORES_PAGE)
        ).all()
        for idx, flagged, delta in rows:
            scan.add(idx, bool(flagged), math.nan if delta is None else delta)
        if len(rows) < SCORES_PAGE:
            return scan
        last = rows[-1][0]


def flagged_samples(
    session: Session, job: LatestJob, top: Sequence[tuple[float, int]]
) -> list[FlaggedSample]:
    if not top:
        return []
    rows = session.execute(
        select(DatasetSample.idx, DatasetSample.line, DatasetSample.record).where(
            DatasetSample.dataset_id == job.dataset_id,
            DatasetSample.idx.in_([idx for _, idx in top]),
        )
    )
    stored = {idx: (line, record) for idx, line, record in rows}
    fmt = DatasetFormat(job.format)
    out = []
    for difference, idx in top:
        if idx not in stored:  # the dataset was deleted since the scores were read
            continue
        line, record = stored[idx]
        sample = sample_from_record(json.loads(record), fmt, idx, line)
        text = shorten(response_text(sample))
        out.append(FlaggedSample(index=idx, line=line, difference=difference, text=text))
    return out


def role_risk(
    session: Session, role: Role, job: LatestJob | None, *, samples: int, bins: int
) -> RoleRisk:
    if job is None:
        return RoleRisk(role_id=role.id, role_name=role.name)
    scan = scan_scores(session, job.job_id, samples)
    n, k = scan.num_samples, scan.num_flagged
    return RoleRisk(
        role_id=role.id,
        role_name=role.name,
        scoring_job_id=job.job_id,
        dataset_id=job.dataset_id,
        model=job.model,
        finished_at=timestamp(job.finished_at),
        num_samples=n,
        num_flagged=k,
        flagged_fraction=k / n if n else None,
        flagged_interval=wilson_interval(k, n) if n else None,
        margin=job.margin,
        difference=summarize(scan.differences, bins),
        top_flagged=flagged_samples(session, job, scan.most_flagged()),
    )


def role_risks(
    session: Session, tenant_id: str, params: ListParams, *, samples: int, bins: int
) -> ListResponse[RoleRisk]:
    """A page of the tenant's roles (newest first, as GET /v1/roles) with their risk."""
    roles, more = paginate(
        session, select(Role).where(Role.tenant_id == tenant_id), Role.id, params, params.after
    )
    latest = latest_succeeded_jobs(session, tenant_id, [role.id for role in roles])
    data = [role_risk(session, r, latest.get(r.id), samples=samples, bins=bins) for r in roles]
    return ListResponse(data=data, has_more=more)
