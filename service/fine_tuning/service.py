"""Fine-tuning jobs: creation checks, cancel, and where their artifacts live."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service.core import job_state
from service.core.config import get_settings
from service.core.db import after_commit
from service.core.errors import Conflict, NotFound, Unprocessable
from service.core.events import add_event, timestamp
from service.core.ids import new_id
from service.core.queue import TRAINING_QUEUE, get_queue
from service.core.scoping import get_owned
from service.datasets import service as datasets
from service.fine_tuning.schemas import (
    EvaluationIn,
    FineTuningJobCreate,
    FineTuningJobOut,
    FineTuningProgress,
    Hyperparameters,
)
from service.models import FineTuningJob, JobStatus
from service.scoring_jobs import service as scoring_jobs
from trainer.config import LoraSettings, Method, TrainConfig

RUN_JOB = "trainer.jobs.run_fine_tuning_job"
ADAPTER_ARCHIVE = "adapter.tar.gz"  # LoRA runs: the PEFT adapter directory
MODEL_ARCHIVE = "model.tar.gz"  # full fine-tuning: safetensors checkpoint and tokenizer
REPORT_FILES = {"json": "report.json", "html": "report.html"}
FULL_FT_LEARNING_RATE = 2e-5  # the authors' rate for full fine-tuning
LORA_LEARNING_RATE = 1e-4


def artifact_dir(job_id: str) -> Path:
    return get_settings().artifacts_path / "fine_tuning" / job_id


def train_config(method: Method, hp: Hyperparameters) -> TrainConfig:
    """The trainer's config for a request; inconsistent values are a 422 naming the field."""
    lora = None if hp.lora is None else LoraSettings(**hp.lora.model_dump())
    rate = hp.learning_rate or (LORA_LEARNING_RATE if lora else FULL_FT_LEARNING_RATE)
    micro = hp.micro_batch_size or min(4, hp.batch_size)
    # The request's names are the trainer's (``lambda`` is the alias of ``lambda_kl``).
    same = hp.model_dump(exclude={"lora", "learning_rate", "micro_batch_size"})
    try:
        return TrainConfig(
            method=method, lora=lora, learning_rate=rate, micro_batch_size=micro, **same
        )
    except ValueError as exc:
        raise Unprocessable(str(exc), param="hyperparameters") from exc


def evaluation_plan(evaluation: EvaluationIn) -> dict[str, Any]:
    """The evaluation as the trainer runs it: safety sets resolved against the server's."""
    settings = get_settings()
    configured = settings.eval_set_paths
    if evaluation.safety_sets is None:
        sets: list[dict[str, Any]] = [{"name": n} for n in settings.default_eval_set_names]
    else:
        sets = []
        for given in evaluation.safety_sets:
            if given.prompts is None and given.name not in configured:
                raise Unprocessable(
                    f"no safety set {given.name!r} on this server (configured: "
                    f"{sorted(configured) or 'none'}); send its prompts inline instead",
                    param="evaluation.safety_sets",
                )
            sets.append(given.model_dump(exclude_none=True))
        names = [s["name"] for s in sets]
        if len(set(names)) != len(names):
            raise Unprocessable("safety set names must be unique", param="evaluation.safety_sets")
    plan = evaluation.model_dump(exclude={"safety_sets"})
    plan["safety_sets"] = sets
    return plan


def create(session: Session, tenant_id: str, body: FineTuningJobCreate) -> FineTuningJob:
    dataset = datasets.get(session, tenant_id, body.dataset_id)
    scoring = scoring_jobs.get(session, tenant_id, body.scoring_job_id)
    if scoring.dataset_id != dataset.id:
        raise Unprocessable(
            f"scoring job {scoring.id} scored dataset {scoring.dataset_id}, not {dataset.id}",
            param="scoring_job_id",
        )
    if scoring.status != JobStatus.SUCCEEDED:
        raise Conflict(
            f"scoring job {scoring.id} is {scoring.status}; fine-tuning needs its flags, "
            "so it must have succeeded",
            param="scoring_job_id",
        )
    config = train_config(body.method, body.hyperparameters)
    plan = None if body.evaluation is None else evaluation_plan(body.evaluation)
    job = FineTuningJob(
        id=new_id("ftjob"),
        tenant_id=tenant_id,
        dataset_id=dataset.id,
        scoring_job_id=scoring.id,
        status=JobStatus.QUEUED,
        phase="queued",
        # The flags came from this model's rewards; training starts from the same weights.
        model=scoring.model,
        method=config.method,
        hyperparameters=config.to_dict(),
        evaluation=plan,
        step=0,
        attempts=0,
    )
    session.add(job)
    add_event(session, job.id, "job created", method=config.method, samples=dataset.num_samples)
    session.flush()
    enqueue(session, job.id)
    return job


def enqueue(session: Session, job_id: str) -> None:
    """Enqueue after the surrounding transaction commits, never before."""
    after_commit(session, lambda: get_queue().enqueue(TRAINING_QUEUE, RUN_JOB, job_id))


def get(session: Session, tenant_id: str, job_id: str) -> FineTuningJob:
    return get_owned(
        session, FineTuningJob, job_id, tenant_id, what="fine-tuning job", param="job_id"
    )


def cancel(session: Session, tenant_id: str, job_id: str) -> FineTuningJob:
    return job_state.cancel(session, get(session, tenant_id, job_id))


def artifact(job: FineTuningJob, name: str) -> Path:
    """A finished job's file, or a 409 (not succeeded) / 404 (removed from the server)."""
    if job.status != JobStatus.SUCCEEDED:
        raise Conflict(f"the job is {job.status}; artifacts are ready once it has succeeded")
    path = artifact_dir(job.id) / name
    if not path.is_file():
        raise NotFound(f"{name} of job {job.id} is no longer on this server")
    return path


def archive_name(hyperparameters: Mapping[str, Any]) -> str:
    return MODEL_ARCHIVE if hyperparameters.get("lora") is None else ADAPTER_ARCHIVE


def _evaluation_out(plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """The plan without inline prompts (they can be long): each set shows its count."""
    if plan is None:
        return None
    sets = [
        {"name": s["name"], **({"num_prompts": len(s["prompts"])} if "prompts" in s else {})}
        for s in plan.get("safety_sets", [])
    ]
    return {**plan, "safety_sets": sets}


def to_out(job: FineTuningJob) -> FineTuningJobOut:
    return FineTuningJobOut(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        dataset_id=job.dataset_id,
        scoring_job_id=job.scoring_job_id,
        status=JobStatus(job.status).value,
        model=job.model,
        method=job.method,
        hyperparameters=job.hyperparameters,
        evaluation=_evaluation_out(job.evaluation),
        progress=FineTuningProgress(phase=job.phase, step=job.step, total_steps=job.total_steps),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
        error=job.error,
        result=job.result,
    )
