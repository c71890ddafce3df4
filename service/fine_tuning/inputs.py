"""A fine-tuning job's inputs, read from the database as the pipeline's plain data: the
samples, their scores with the effective flags the job recorded, the role's prompts."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from service.core.db import session_scope
from service.curation.flags import apply_snapshot
from service.datasets.repository import load_samples
from service.models import Dataset, FineTuningJob, Role, ScoringJob
from service.roles.service import prompts_of
from service.scoring_jobs.service import load_scores
from trainer.config import EvalConfig, TrainConfig
from trainer.run_spec import RunInputs
from worker.packaged_models import is_bundled


class InvalidInputs(RuntimeError):
    """The job's rows cannot be trained on (a deleted dataset, samples without a score)."""


def load_inputs(job_id: str) -> RunInputs:
    """The job's rows as the pipeline's plain data, read in one transaction."""
    with session_scope() as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None
        dataset = session.get(Dataset, job.dataset_id)
        scoring = session.get(ScoringJob, job.scoring_job_id)
        if dataset is None or scoring is None:
            raise InvalidInputs("the dataset or its scoring job was deleted")
        role = session.get(Role, dataset.role_id)
        assert role is not None
        curation = job.curation or {}
        samples, scores = _scored_samples(session, dataset, scoring, curation)
        validation: list[Any] | None = None
        validation_scores: list[dict[str, Any]] = []
        if job.validation_dataset_id is not None:
            v_dataset = session.get(Dataset, job.validation_dataset_id)
            v_scoring = session.get(ScoringJob, job.validation_scoring_job_id)
            if v_dataset is None or v_scoring is None:
                raise InvalidInputs("the validation dataset or its scoring job was deleted")
            validation, validation_scores = _scored_samples(
                session, v_dataset, v_scoring, curation.get("validation")
            )
        return RunInputs(
            run_id=job.id,
            model=None if is_bundled(job.model) else job.model,
            config=TrainConfig.from_dict(job.hyperparameters),
            evaluation=None if job.evaluation is None else EvalConfig.from_dict(job.evaluation),
            prompts=prompts_of(role),
            samples=samples,
            scores=scores,
            margin=scoring.margin,
            curation=job.curation,
            validation_samples=validation,
            validation_scores=validation_scores,
        )


def _scored_samples(
    session: Session, dataset: Dataset, scoring: ScoringJob, curation: dict[str, Any] | None
) -> tuple[list[Any], list[dict[str, Any]]]:
    """The samples and their scores, each ``flagged`` the effective flag the job recorded."""
    samples = load_samples(session, dataset)
    scores = load_scores(session, scoring.id)
    apply_snapshot(scores, curation)
    missing = [s.index for s in samples if s.index not in scores]
    if missing:
        raise InvalidInputs(
            f"{len(missing)} samples of {dataset.id} have no score (first: {missing[0]})"
        )
    return samples, [scores[s.index] for s in samples]
