"""Fine-tuning jobs: creation checks (the request turned into the trainer's configs), cancel."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core import job_state
from service.core.config import get_settings
from service.core.errors import Conflict, Unprocessable
from service.core.events import add_event, timestamp
from service.core.ids import new_id
from service.core.queue import require_queue
from service.core.scoping import get_owned
from service.curation import flags
from service.datasets import service as datasets
from service.fine_tuning.schemas import (
    EvaluationIn,
    FineTuningJobCreate,
    FineTuningJobOut,
    FineTuningProgress,
    Hyperparameters,
    JobError,
)
from service.fine_tuning.tasks import enqueue
from service.models import Dataset, FineTuningJob, JobStatus, ScoringJob
from service.scoring_jobs import service as scoring_jobs
from service.scoring_jobs.tasks import scoring_encoding
from trainer.config import (
    EvalConfig,
    JudgeSettings,
    LoraSettings,
    Method,
    SafetySet,
    TrainConfig,
    default_learning_rate,
)
from trainer.jailbreaks import available_sets
from trainer.run_spec import Phase
from worker.encoding import EncodingConfig

_DEFAULT_MICRO_BATCH = TrainConfig().micro_batch_size
_TRUNCATION = ("max_prompt_tokens", "max_response_tokens")


def train_config(
    method: Method, hp: Hyperparameters, scoring: EncodingConfig | None = None
) -> TrainConfig:
    """The trainer's config for a request; inconsistent values are a 422 naming the field.

    Samples are truncated as the scoring job truncated them (``scoring``): the flags belong to
    that encoding, so a request may repeat its values but not change them.
    """
    scoring = scoring or EncodingConfig()
    for name in _TRUNCATION:
        given, scored = getattr(hp, name), getattr(scoring, name)
        if given is not None and given != scored:
            raise Unprocessable(
                f"{name} must be the scoring job's ({scored}): its flags were computed on that "
                f"truncation, got {given}",
                param=f"hyperparameters.{name}",
            )
    if hp.optimizer_in_backward and (processes := get_settings().training_processes) > 1:
        raise Unprocessable(
            f"optimizer_in_backward runs in one process; this server trains in {processes}",
            param="hyperparameters.optimizer_in_backward",
        )
    lora = None if hp.lora is None else LoraSettings(**hp.lora.model_dump())
    rate = hp.learning_rate or default_learning_rate(lora is not None)
    # The default micro-batch divides the batch (a batch of 6 runs as 2 x 3, not 4 + 2); an
    # optimizer stepped in the backward takes the whole batch in one.
    micro = hp.micro_batch_size or (
        hp.batch_size
        if hp.optimizer_in_backward
        else max(
            d
            for d in range(1, min(_DEFAULT_MICRO_BATCH, hp.batch_size) + 1)
            if hp.batch_size % d == 0
        )
    )
    # The request's names are the trainer's (``lambda`` is the alias of ``lambda_kl``).
    derived = {"lora", "learning_rate", "micro_batch_size", *_TRUNCATION}
    same = hp.model_dump(exclude=derived)
    try:
        return TrainConfig(
            method=method,
            lora=lora,
            learning_rate=rate,
            micro_batch_size=micro,
            max_prompt_tokens=scoring.max_prompt_tokens,
            max_response_tokens=scoring.max_response_tokens,
            **same,
        )
    except ValueError as exc:
        raise Unprocessable(str(exc), param="hyperparameters") from exc


def eval_config(evaluation: EvaluationIn) -> EvalConfig:
    """The evaluation as the trainer runs it: safety sets checked against the server's."""
    settings = get_settings()
    configured = available_sets(settings.eval_set_paths)
    if evaluation.safety_sets is None:
        sets = tuple(SafetySet(name) for name in settings.default_eval_set_names)
    else:
        for given in evaluation.safety_sets:
            if given.prompts is None and given.name not in configured:
                raise Unprocessable(
                    f"no safety set {given.name!r} on this server (configured: "
                    f"{sorted(configured) or 'none'}); send its prompts inline instead",
                    param="evaluation.safety_sets",
                )
        names = [s.name for s in evaluation.safety_sets]
        if len(set(names)) != len(names):
            raise Unprocessable("safety set names must be unique", param="evaluation.safety_sets")
        sets = tuple(
            SafetySet(s.name, None if s.prompts is None else tuple(s.prompts))
            for s in evaluation.safety_sets
        )
    numbers = evaluation.model_dump(exclude={"safety_sets", "judge", "settings"})
    try:
        return EvalConfig(
            safety_sets=sets,
            judge=JudgeSettings(**evaluation.judge.model_dump()),
            settings=tuple(evaluation.settings),
            **numbers,
        )
    except ValueError as exc:
        raise Unprocessable(str(exc), param="evaluation") from exc


def create(session: Session, tenant_id: str, body: FineTuningJobCreate) -> FineTuningJob:
    require_queue()
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
    hp = body.hyperparameters
    if body.seed is not None:
        if "seed" in hp.model_fields_set and hp.seed != body.seed:
            raise Unprocessable(
                f"seed {body.seed} contradicts hyperparameters.seed {hp.seed}", param="seed"
            )
        hp = hp.model_copy(update={"seed": body.seed})
    config = train_config(body.method, hp, scoring_encoding(scoring))
    plan = None if body.evaluation is None else eval_config(body.evaluation)
    validation = validation_scoring = None
    if body.validation_dataset_id is not None:
        validation, validation_scoring = _validation_inputs(
            session, tenant_id, body.validation_dataset_id, dataset, scoring
        )
    # The effective flags now: reviews made later change neither this run nor its report.
    curation = flags.snapshot(session, scoring.id)
    curation["validation"] = (
        None if validation_scoring is None else flags.snapshot(session, validation_scoring.id)
    )
    job = FineTuningJob(
        id=new_id("ftjob"),
        tenant_id=tenant_id,
        dataset_id=dataset.id,
        scoring_job_id=scoring.id,
        validation_dataset_id=None if validation is None else validation.id,
        validation_scoring_job_id=None if validation_scoring is None else validation_scoring.id,
        suffix=body.suffix,
        user_metadata=body.metadata,
        trained_tokens=0,
        status=JobStatus.QUEUED,
        phase=Phase.QUEUED,
        # The flags came from this model's rewards; training starts from the same weights.
        model=scoring.model,
        method=config.method,
        hyperparameters=config.to_dict(),
        evaluation=None if plan is None else plan.to_dict(),
        step=0,
        attempts=0,
        curation=curation,
    )
    session.add(job)
    add_event(
        session, job.id, "job created", method=config.method, samples=dataset.num_samples,
        flagged=curation["flagged"], overrides_to_flag=len(curation["to_flag"]),
        overrides_to_keep=len(curation["to_keep"]),
    )  # fmt: skip
    session.flush()
    enqueue(session, job.id)
    return job


def _validation_inputs(
    session: Session, tenant_id: str, dataset_id: str, train: Dataset, scoring: ScoringJob
) -> tuple[Dataset, ScoringJob]:
    """The validation dataset and its newest succeeded scoring job with the training model."""
    param = "validation_dataset_id"
    validation = datasets.get(session, tenant_id, dataset_id)
    if validation.id == train.id:
        raise Unprocessable("the validation dataset is the training dataset", param=param)
    if validation.role_id != train.role_id:
        raise Unprocessable(
            f"dataset {validation.id} belongs to another role than {train.id}", param=param
        )
    scored = session.scalar(
        select(ScoringJob)
        .where(
            ScoringJob.dataset_id == validation.id,
            ScoringJob.status == JobStatus.SUCCEEDED,
            ScoringJob.model == scoring.model,
            ScoringJob.margin == scoring.margin,
        )
        .order_by(ScoringJob.created_at.desc())
        .limit(1)
    )
    if scored is None:
        raise Conflict(
            f"dataset {validation.id} has no succeeded scoring job with model "
            f"{scoring.model or 'default'} and margin {scoring.margin}: its KL needs the flags, "
            "so score it first",
            param=param,
        )
    return validation, scored


def get(session: Session, tenant_id: str, job_id: str) -> FineTuningJob:
    return get_owned(
        session, FineTuningJob, job_id, tenant_id, what="fine-tuning job", param="job_id"
    )


def cancel(session: Session, tenant_id: str, job_id: str) -> FineTuningJob:
    return job_state.cancel(session, get(session, tenant_id, job_id))


def _evaluation_out(plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """The plan without inline prompts (they can be long): each set shows its count."""
    if plan is None:
        return None
    sets = [
        {"name": s["name"], **({"num_prompts": len(s["prompts"])} if "prompts" in s else {})}
        for s in plan.get("safety_sets", [])
    ]
    return {**plan, "safety_sets": sets}


def _status(job: FineTuningJob) -> str:
    # OpenAI's status while the inputs are checked; the row says running (a worker holds it).
    if job.status == JobStatus.RUNNING and job.phase == Phase.VALIDATING_FILES:
        return "validating_files"
    return JobStatus(job.status).value


def to_out(job: FineTuningJob) -> FineTuningJobOut:
    error = None
    if job.error is not None:
        error = JobError(code=job.error_code or "internal_error", message=job.error)
    return FineTuningJobOut(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        dataset_id=job.dataset_id,
        scoring_job_id=job.scoring_job_id,
        validation_dataset_id=job.validation_dataset_id,
        validation_scoring_job_id=job.validation_scoring_job_id,
        status=_status(job),  # type: ignore[arg-type]
        fine_tuned_model=job.fine_tuned_model,
        trained_tokens=job.trained_tokens or 0,
        estimated_finish=timestamp(job.estimated_finish),
        seed=int(job.hyperparameters.get("seed", 0)),
        suffix=job.suffix,
        metadata=job.user_metadata,
        model=job.model,
        method=job.method,
        hyperparameters=job.hyperparameters,
        evaluation=_evaluation_out(job.evaluation),
        progress=FineTuningProgress(phase=job.phase, step=job.step, total_steps=job.total_steps),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
        error=error,
        result=job.result,
        curation=job.curation,
    )
