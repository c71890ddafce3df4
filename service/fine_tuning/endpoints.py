from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
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
from service.fine_tuning import export_tasks, service
from service.fine_tuning.schemas import FineTuningJobCreate, FineTuningJobOut
from service.fine_tuning.storage import artifact
from service.models import FineTuningJob
from trainer.artifacts import MERGED_MODEL_ARCHIVE, REPORT_FILES, archive_name

router = APIRouter(
    prefix="/v1/fine_tuning/jobs", tags=["fine-tuning jobs"], responses=ERROR_RESPONSES
)
NOT_READY: dict[int | str, dict[str, Any]] = {409: {"description": "The job has not succeeded"}}


@router.post(
    "",
    status_code=201,
    response_model=FineTuningJobOut,
    responses={409: {"description": "The scoring job has not succeeded"}},
)
def create_fine_tuning_job(
    body: FineTuningJobCreate, session: SessionDep, tenant: TenantDep
) -> FineTuningJobOut:
    """Fine-tune the scoring job's model on the dataset with the SaRFT loss, then evaluate."""
    return service.to_out(service.create(session, tenant, body))


@router.get("", response_model=ListResponse[FineTuningJobOut])
def list_fine_tuning_jobs(
    session: SessionDep, tenant: TenantDep, params: Annotated[ListParams, Depends(list_params)]
) -> ListResponse[FineTuningJobOut]:
    """List the tenant's fine-tuning jobs, newest first."""
    stmt = select(FineTuningJob).where(FineTuningJob.tenant_id == tenant)
    rows, more = paginate(session, stmt, FineTuningJob.id, params, params.after)
    return ListResponse(data=[service.to_out(r) for r in rows], has_more=more)


@router.get("/{job_id}", response_model=FineTuningJobOut)
def get_fine_tuning_job(job_id: str, session: SessionDep, tenant: TenantDep) -> FineTuningJobOut:
    """Status, phase, progress in optimizer steps and, once succeeded, the evaluation."""
    return service.to_out(service.get(session, tenant, job_id))


@router.get("/{job_id}/events", response_model=ListResponse[EventOut])
def list_fine_tuning_job_events(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    params: Annotated[ListParams, Depends(event_list_params)],
) -> ListResponse[EventOut]:
    """The job's events (one per optimizer step with its loss, CE, KL), newest first."""
    job = service.get(session, tenant, job_id)
    return list_events(session, job.id, params, kind="fine_tuning.job")


@router.post(
    "/{job_id}/cancel",
    response_model=FineTuningJobOut,
    responses={409: {"description": "Finished"}},
)
def cancel_fine_tuning_job(job_id: str, session: SessionDep, tenant: TenantDep) -> FineTuningJobOut:
    """Cancel a queued or running job; a running one stops before its next step or batch."""
    return service.to_out(service.cancel(session, tenant, job_id))


@router.get(
    "/{job_id}/adapter",
    response_class=FileResponse,
    responses={200: {"content": {"application/gzip": {}}}, **NOT_READY},
)
def download_adapter(job_id: str, session: SessionDep, tenant: TenantDep) -> FileResponse:
    """The trained LoRA adapter (PEFT format) as .tar.gz; full fine-tuning: the checkpoint."""
    job = service.get(session, tenant, job_id)
    name = archive_name(lora=job.hyperparameters.get("lora") is not None)
    return FileResponse(
        artifact(job, name),
        media_type="application/gzip",
        filename=f"{job.id}-{name}",
    )


@router.get(
    "/{job_id}/report",
    response_class=FileResponse,
    responses={200: {"content": {"application/json": {}, "text/html": {}}}, **NOT_READY},
)
def download_report(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    format: Annotated[Literal["json", "html"], Query(description="json or html")] = "json",
) -> FileResponse:
    """The evaluation report: scores, training curves, refusal rates and ROUGE-L before/after."""
    job = service.get(session, tenant, job_id)
    return FileResponse(
        artifact(job, REPORT_FILES[format]),
        media_type="application/json" if format == "json" else "text/html; charset=utf-8",
        filename=f"{job.id}-report.{format}",
    )


# --- the merged model: base + adapter as one checkpoint ------------------------------------------


class ModelExportOut(BaseModel):
    object: Literal["fine_tuning.job.model_export"] = "fine_tuning.job.model_export"
    job_id: str
    status: export_tasks.ExportStatus = Field(
        description="queued or running on a training worker; ready: GET the same path"
    )
    bytes: int | None = Field(None, description="The archive's size, once ready")


@router.post(
    "/{job_id}/model",
    status_code=202,
    response_model=ModelExportOut,
    response_model_exclude_none=True,
    responses={
        202: {"description": "The export is queued, running or ready"},
        409: {"description": "The job has not succeeded"},
    },
)
def export_model(job_id: str, session: SessionDep, tenant: TenantDep) -> ModelExportOut:
    """Export the fine-tuned model as one checkpoint: the base model with the LoRA adapter
    merged into its weights, in the base's dtype, as a .tar.gz of a Hugging Face directory
    (config.json, safetensors, tokenizer, generation config) that `from_pretrained` and vLLM
    load. A training worker merges it; a full fine-tuning job's checkpoint is ready at once.
    Idempotent: asking again while it is queued or running, or once it is ready, queues
    nothing; asking after a failed export runs it again."""
    job = service.get(session, tenant, job_id)
    status, archive = export_tasks.request_export(session, job)
    return ModelExportOut(
        job_id=job.id, status=status, bytes=None if archive is None else archive.stat().st_size
    )


@router.get(
    "/{job_id}/model",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/gzip": {}},
            "description": "The merged model (full fine-tuning: the checkpoint) as .tar.gz",
        },
        409: {
            "description": "The job has not succeeded, or its export is not ready: "
            "`export_in_progress` while queued or running; otherwise POST the same path first"
        },
    },
)
def download_model(job_id: str, session: SessionDep, tenant: TenantDep) -> FileResponse:
    """The exported model (see the POST on this path) as .tar.gz, once ready."""
    job = service.get(session, tenant, job_id)
    state = export_tasks.export_state(session, job)
    if state.archive is None:
        raise export_tasks.not_ready(job, state)
    return FileResponse(
        state.archive,
        media_type="application/gzip",
        filename=f"{job.id}-{MERGED_MODEL_ARCHIVE}",
    )
