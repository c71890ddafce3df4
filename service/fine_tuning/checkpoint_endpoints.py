"""A fine-tuning job's checkpoints, listed as OpenAI lists them, and their weights."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from service.core.auth import TenantDep
from service.core.deps import SessionDep
from service.core.errors import ERROR_RESPONSES, NotFound
from service.core.pagination import ListParams, ListResponse, list_params, paginate
from service.fine_tuning import service
from service.fine_tuning.storage import artifact_dir
from service.fine_tuning.tasks import fine_tuned_model_name
from service.models import FineTuningCheckpoint

router = APIRouter(
    prefix="/v1/fine_tuning/jobs", tags=["fine-tuning jobs"], responses=ERROR_RESPONSES
)

# The trainer's metric names -> OpenAI's (train_loss, valid_loss...) and the SaRFT terms.
_METRIC_NAMES = {
    "loss": "train_loss",
    "ce": "train_ce",
    "kl": "train_kl",
    "valid_loss": "valid_loss",
    "valid_ce": "valid_ce",
    "valid_kl": "valid_kl",
    "lr": "learning_rate",
    "grad_norm": "grad_norm",
    "trained_tokens": "trained_tokens",
}


class CheckpointOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str = Field(description="ft:<base>:<suffix>:<job id>:ckpt-step-N")
    step_number: int
    metrics: dict[str, float] = Field(
        description="step, train_loss, train_ce, train_kl; valid_loss, valid_ce and valid_kl "
        "when the job validates; learning_rate, grad_norm, trained_tokens."
    )


def _out(checkpoint: FineTuningCheckpoint, model_name: str) -> CheckpointOut:
    metrics: dict[str, float] = {"step": float(checkpoint.step_number)}
    for name, value in checkpoint.metrics.items():
        if name in _METRIC_NAMES:
            metrics[_METRIC_NAMES[name]] = value
    return CheckpointOut(
        id=checkpoint.id,
        created_at=int(checkpoint.created_at.timestamp()),
        fine_tuning_job_id=checkpoint.job_id,
        fine_tuned_model_checkpoint=f"{model_name}:ckpt-step-{checkpoint.step_number}",
        step_number=checkpoint.step_number,
        metrics=metrics,
    )


@router.get("/{job_id}/checkpoints", response_model=ListResponse[CheckpointOut])
def list_fine_tuning_checkpoints(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    params: Annotated[ListParams, Depends(list_params)],
) -> ListResponse[CheckpointOut]:
    """The checkpoints the job keeps, newest first: every N steps and the final step (the
    server's SARFT_CHECKPOINT_EVERY and SARFT_CHECKPOINT_KEEP), listed while it runs too."""
    job = service.get(session, tenant, job_id)
    stmt = select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job.id)
    rows, more = paginate(session, stmt, FineTuningCheckpoint.id, params, params.after)
    name = fine_tuned_model_name(job)
    return ListResponse(data=[_out(r, name) for r in rows], has_more=more)


ARCHIVE: dict[int | str, dict[str, Any]] = {200: {"content": {"application/gzip": {}}}}


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}/content", response_class=FileResponse, responses=ARCHIVE
)
def download_fine_tuning_checkpoint(
    job_id: str, checkpoint_id: str, session: SessionDep, tenant: TenantDep
) -> FileResponse:
    """The checkpoint's weights as .tar.gz: the PEFT adapter (LoRA) or the model and
    tokenizer (full fine-tuning), as the final download holds them."""
    job = service.get(session, tenant, job_id)
    # Postgres refuses NUL in a query, and no id holds one.
    checkpoint = (
        None if "\x00" in checkpoint_id else session.get(FineTuningCheckpoint, checkpoint_id)
    )
    if checkpoint is None or checkpoint.job_id != job.id:
        raise NotFound(f"no checkpoint {checkpoint_id} of job {job.id}", param="checkpoint_id")
    path = artifact_dir(job.id) / checkpoint.archive
    if not path.is_file():  # pruned between the listing and this request, or cancelled
        raise NotFound(f"checkpoint {checkpoint_id} is no longer on this server")
    return FileResponse(
        path,
        media_type="application/gzip",
        filename=f"{job.id}-step-{checkpoint.step_number}-{path.name}",
    )
