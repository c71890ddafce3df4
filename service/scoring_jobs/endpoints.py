from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from service.core.auth import TenantDep
from service.core.deps import SessionDep
from service.core.errors import ERROR_RESPONSES
from service.core.events import EventOut, list_events
from service.core.pagination import (
    ListParams,
    ListResponse,
    event_list_params,
    list_params,
    paginate,
)
from service.models import ScoringJob
from service.scoring_jobs import service
from service.scoring_jobs.schemas import ScoringJobCreate, ScoringJobOut

router = APIRouter(prefix="/v1/scoring_jobs", tags=["scoring jobs"], responses=ERROR_RESPONSES)


@router.post("", status_code=201, response_model=ScoringJobOut)
def create_scoring_job(
    body: ScoringJobCreate, session: SessionDep, tenant: TenantDep
) -> ScoringJobOut:
    """Score every sample of a dataset under the role, unsafe and reference prompts."""
    return service.to_out(service.create(session, tenant, body))


@router.get("", response_model=ListResponse[ScoringJobOut])
def list_scoring_jobs(
    session: SessionDep, tenant: TenantDep, params: Annotated[ListParams, Depends(list_params)]
) -> ListResponse[ScoringJobOut]:
    """List the tenant's scoring jobs, newest first."""
    stmt = select(ScoringJob).where(ScoringJob.tenant_id == tenant)
    rows, more = paginate(session, stmt, ScoringJob.id, params, params.after)
    return ListResponse(data=[service.to_out(r) for r in rows], has_more=more)


@router.get("/{job_id}", response_model=ScoringJobOut)
def get_scoring_job(job_id: str, session: SessionDep, tenant: TenantDep) -> ScoringJobOut:
    """Status, progress and, once succeeded, the result summary."""
    return service.to_out(service.get(session, tenant, job_id))


@router.get("/{job_id}/events", response_model=ListResponse[EventOut])
def list_scoring_job_events(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    params: Annotated[ListParams, Depends(event_list_params)],
) -> ListResponse[EventOut]:
    """The job's events, newest first (after: an event id such as evt_42)."""
    job = service.get(session, tenant, job_id)
    return list_events(session, job.id, params, kind="scoring_job")


@router.post(
    "/{job_id}/cancel", response_model=ScoringJobOut, responses={409: {"description": "Finished"}}
)
def cancel_scoring_job(job_id: str, session: SessionDep, tenant: TenantDep) -> ScoringJobOut:
    """Cancel a queued or running job; a running one stops at its next chunk."""
    return service.to_out(service.cancel(session, tenant, job_id))


@router.get(
    "/{job_id}/subset",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/x-ndjson": {}}, "description": "JSONL in upload order"},
        409: {"description": "The job has not succeeded"},
    },
)
def download_subset(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    which: Annotated[Literal["flagged", "all"], Query(description="flagged or all")] = "flagged",
) -> StreamingResponse:
    """Download samples in their uploaded form with their scores attached."""
    job = service.get(session, tenant, job_id)
    service.check_downloadable(job)
    return StreamingResponse(
        service.stream_subset(job.id, job.dataset_id, flagged_only=which == "flagged"),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{job.id}-{which}.jsonl"'},
    )
