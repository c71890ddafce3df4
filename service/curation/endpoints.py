"""The review API: a scoring job's samples with their scores, and reviewers' decisions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query

from service.core.auth import CallerDep, TenantDep
from service.core.deps import SessionDep
from service.core.errors import ERROR_RESPONSES
from service.core.pagination import ListParams, ListResponse
from service.curation import service
from service.curation.flags import curation_counts
from service.curation.schemas import (
    INDEX_MAX,
    BulkReviewIn,
    CurationOut,
    Decision,
    MeOut,
    ReviewIn,
    SampleOrder,
    SampleOut,
)
from service.scoring_jobs import service as scoring

router = APIRouter(prefix="/v1/scoring_jobs", tags=["review"], responses=ERROR_RESPONSES)
me_router = APIRouter(prefix="/v1", tags=["review"], responses=ERROR_RESPONSES)

Index = Annotated[int, Path(ge=0, le=INDEX_MAX, description="The sample's 0-based index.")]


def sample_list_params(
    after: Annotated[
        str | None,
        Query(
            pattern=r"^[0-9]{1,10}$",
            description="Return samples after this one: the index of a previous page's last.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size (1-100).")] = 20,
) -> ListParams:
    return ListParams(after=after, limit=limit)


NOT_SUCCEEDED: dict[int | str, dict[str, Any]] = {
    409: {"description": "The scoring job has not succeeded"}
}


@me_router.get("/me", response_model=MeOut)
def who_am_i(caller: CallerDep) -> MeOut:
    """The caller's tenant and key name (the name recorded with each review)."""
    return MeOut(tenant=caller.tenant_name, name=caller.name)


@router.get("/{job_id}/samples", response_model=ListResponse[SampleOut])
def list_samples(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    params: Annotated[ListParams, Depends(sample_list_params)],
    flagged: Annotated[bool | None, Query(description="By the effective flag.")] = None,
    rds_flagged: Annotated[bool | None, Query(description="By RDS's flag.")] = None,
    reviewed: Annotated[bool | None, Query(description="Reviewed or not.")] = None,
    decision: Annotated[Decision | None, Query(description="By the review's decision.")] = None,
    q: Annotated[
        str | None,
        Query(max_length=200, description="Case-insensitive text in the uploaded record."),
    ] = None,
    order: Annotated[
        SampleOrder, Query(description="By s_unsafe - s_role (riskiest first), or by index.")
    ] = "difference_desc",
) -> ListResponse[SampleOut]:
    """The job's samples with their messages, scores, RDS flag, review and effective flag;
    ``after``: the index of the previous page's last sample."""
    job = scoring.get(session, tenant, job_id)
    where = service.SampleFilter(flagged, rds_flagged, reviewed, decision, q)
    data, more = service.list_samples(session, job, where, order, params.limit, params.after)
    return ListResponse(data=data, has_more=more)


@router.get("/{job_id}/samples/{index}", response_model=SampleOut)
def get_sample(job_id: str, index: Index, session: SessionDep, tenant: TenantDep) -> SampleOut:
    """One sample: its full dialogue, scores, review and effective flag."""
    return service.get_sample(session, scoring.get(session, tenant, job_id), index)


@router.put("/{job_id}/samples/{index}/review", response_model=SampleOut, responses=NOT_SUCCEEDED)
def review_sample(
    job_id: str, index: Index, body: ReviewIn, session: SessionDep, caller: CallerDep
) -> SampleOut:
    """Flag or keep a sample (overruling RDS's flag), or clear the review (decision null).
    Recorded with the key's name and the time, and as an event of the job."""
    job = scoring.get(session, caller.tenant_id, job_id)
    return service.review_one(session, job, index, body, caller)


@router.post("/{job_id}/reviews", response_model=CurationOut, responses=NOT_SUCCEEDED)
def review_samples(
    job_id: str, body: BulkReviewIn, session: SessionDep, caller: CallerDep
) -> CurationOut:
    """One decision on many samples (up to 1000), as one event; answers the job's counts."""
    job = scoring.get(session, caller.tenant_id, job_id)
    return service.review_many(session, job, body, caller)


@router.get("/{job_id}/curation", response_model=CurationOut)
def get_curation(job_id: str, session: SessionDep, tenant: TenantDep) -> CurationOut:
    """Review progress: samples, RDS-flagged, effectively flagged, reviewed, overrules."""
    job = scoring.get(session, tenant, job_id)
    return service.curation_out(job.id, curation_counts(session, job.id))
