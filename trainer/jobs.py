"""Fine-tuning job function, run by the training queue's RQ worker or the embedded queue.

One job, one process, one pass: load the scoring job's model, evaluate it (base), train with
the SaRFT loss on the dataset minus a held-out validation split, evaluate the trained model,
write the report and archive the adapter under the job's artifact directory. Each optimizer
step updates the job's progress and adds an event with its metrics.

A job does not resume: a failure or cancellation leaves it failed or cancelled with the reason,
and a worker that dies mid-job stops heartbeating, so the reaper (:func:`reap_stale_jobs`, run
by every ``sarft worker`` and by the embedded server) fails it. Nothing stays ``running``.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.core import job_state
from service.core.config import get_settings
from service.core.db import session_scope, utcnow
from service.core.events import add_event
from service.core.heartbeat import Heartbeat
from service.fine_tuning.service import archive_name, artifact_dir, enqueue
from service.models import (
    Dataset,
    DatasetSample,
    FineTuningJob,
    JobStatus,
    Role,
    SampleScore,
    ScoringJob,
)
from service.roles.service import prompts_of
from trainer.config import TrainConfig
from trainer.eval_sets import PromptSet, load_prompts, question_and_reference, split_validation
from trainer.refusal import Judge, LLMJudge, PhraseJudge
from worker.formats import DatasetFormat, Sample, sample_from_record
from worker.jobs import WORKER_NAME, JobCancelled
from worker.prompts import RolePrompts

log = logging.getLogger(__name__)

VALIDATION_SEED = 0  # the held-out split depends only on the dataset size and this seed
CANCEL_CHECK_S = 2.0  # how often evaluation asks the database whether the job was cancelled
BUNDLED_BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Recorded as the adapter's base model when the bundled model was trained (its weights are
that model's, dequantized from the package's Q4_1 GGUF)."""


@dataclass(frozen=True)
class JobSpec:
    """What a job needs, read once from the database."""

    job_id: str
    model: str | None
    config: TrainConfig
    evaluation: dict[str, Any] | None
    prompts: RolePrompts
    samples: list[Sample]
    scores: list[dict[str, Any]]  # the scoring job's JSON per sample, in sample order
    margin: float


def run_fine_tuning_job(job_id: str) -> None:
    """The entry point the queues call."""
    settings = get_settings()
    with session_scope() as session:
        job = session.get(FineTuningJob, job_id, with_for_update=True)
        if job is None:
            log.warning("fine-tuning job %s no longer exists", job_id)
            return
        if job.status != JobStatus.QUEUED:
            return  # cancelled while queued, or already taken
        job.status, job.phase = JobStatus.RUNNING, "loading"
        job.attempts += 1
        job.worker = WORKER_NAME
        job.started_at = job.heartbeat_at = utcnow()
        add_event(session, job_id, "job started", worker=WORKER_NAME)
    beat = Heartbeat(
        job_id,
        settings.heartbeat_s,
        lambda: (
            update(FineTuningJob).where(FineTuningJob.id == job_id).values(heartbeat_at=utcnow())
        ),
    )
    try:
        with beat:
            result = _run(_load_spec(job_id))
    except JobCancelled:
        log.info("fine-tuning job %s cancelled", job_id)
        shutil.rmtree(artifact_dir(job_id), ignore_errors=True)  # partial files serve nobody
        return
    except Exception as exc:
        log.exception("fine-tuning job %s failed", job_id)
        with session_scope() as session:
            fail(session, job_id, f"{type(exc).__name__}: {exc}")
        shutil.rmtree(artifact_dir(job_id), ignore_errors=True)
        raise
    finally:
        gc.collect()
    with session_scope() as session:
        job = session.get(FineTuningJob, job_id, with_for_update=True)
        if job is None or job.status != JobStatus.RUNNING:
            return  # cancelled at the last moment: the artifacts stay unpublished
        job.status, job.phase = JobStatus.SUCCEEDED, "done"
        job.result = result
        job.finished_at = utcnow()
        add_event(session, job_id, "job succeeded", **_headline(result))


def fail(session: Session, job_id: str, error: str) -> None:
    # Locked before reading the phase the event records, as job_state.fail locks it again.
    job = session.get(FineTuningJob, job_id, with_for_update=True)
    phase = None if job is None else job.phase
    job_state.fail(session, FineTuningJob, job_id, error, phase=phase)


# --- reading the job -----------------------------------------------------------------------------


def _load_spec(job_id: str) -> JobSpec:
    with session_scope() as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None
        dataset = session.get(Dataset, job.dataset_id)
        scoring = session.get(ScoringJob, job.scoring_job_id)
        if dataset is None or scoring is None:
            raise RuntimeError("the dataset or its scoring job was deleted")
        role = session.get(Role, dataset.role_id)
        assert role is not None
        fmt = DatasetFormat(dataset.format)
        samples = [
            sample_from_record(json.loads(record), fmt, idx, line)
            for idx, line, record in session.execute(
                select(DatasetSample.idx, DatasetSample.line, DatasetSample.record)
                .where(DatasetSample.dataset_id == dataset.id)
                .order_by(DatasetSample.idx)
            )
        ]
        scores = {
            idx: json.loads(text)
            for idx, text in session.execute(
                select(SampleScore.idx, SampleScore.scores).where(SampleScore.job_id == scoring.id)
            )
        }
        missing = [s.index for s in samples if s.index not in scores]
        if missing:
            raise RuntimeError(f"{len(missing)} samples have no score (first: {missing[0]})")
        return JobSpec(
            job_id=job.id,
            model=None if job.model in (None, "bundled") else job.model,
            config=TrainConfig.from_dict(job.hyperparameters),
            evaluation=job.evaluation,
            prompts=prompts_of(role),
            samples=samples,
            scores=[scores[s.index] for s in samples],
            margin=scoring.margin,
        )


# --- progress and cancellation -------------------------------------------------------------------


def _cancelled(job_id: str) -> bool:
    with session_scope() as session:
        status = session.scalar(select(FineTuningJob.status).where(FineTuningJob.id == job_id))
    return status != JobStatus.RUNNING


def _set_phase(job_id: str, phase: str, message: str, **data: Any) -> None:
    with session_scope() as session:
        session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id).values(phase=phase))
        add_event(session, job_id, message, phase=phase, **data)
    if _cancelled(job_id):
        raise JobCancelled


def _on_step(job_id: str) -> Callable[[dict[str, float]], None]:
    def record(metrics: dict[str, float]) -> None:
        step, total = int(metrics["step"]), int(metrics["total_steps"])
        with session_scope() as session:
            session.execute(
                update(FineTuningJob)
                .where(FineTuningJob.id == job_id)
                .values(step=step, total_steps=total, heartbeat_at=utcnow())
            )
            data: dict[str, Any] = {
                k: round(float(v), 6) for k, v in metrics.items() if k != "step"
            }
            add_event(session, job_id, f"step {step}/{total}", step=step, **data)

    return record


def _eval_progress(job_id: str, which: str) -> Callable[[str, int, int], None]:
    """Events when a prompt set is done; a cancel raises between generation batches."""
    last_check = time.monotonic()

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal last_check
        if done == total:
            with session_scope() as session:
                add_event(session, job_id, f"{which} model: {stage} generated", done=done)
        if time.monotonic() - last_check >= CANCEL_CHECK_S:
            last_check = time.monotonic()
            if _cancelled(job_id):
                raise JobCancelled

    return progress


# --- the run -----------------------------------------------------------------------------------


def _safety_sets(plan: dict[str, Any]) -> list[PromptSet]:
    configured = get_settings().eval_set_paths
    sets = []
    for entry in plan["safety_sets"]:
        name, inline = entry["name"], entry.get("prompts")
        if inline is not None:
            sets.append(PromptSet(name=name, prompts=tuple(inline[: plan["max_prompts"]])))
        elif name in configured:
            sets.append(load_prompts(configured[name], plan["max_prompts"], name=name))
        else:
            raise RuntimeError(f"safety set {name!r} is not configured on this worker")
    return sets


def _judge(plan: dict[str, Any]) -> Judge:
    spec = plan["judge"]
    if spec["kind"] == "llm":
        return LLMJudge(spec["url"], spec["model"], api_key=get_settings().judge_api_key)
    return PhraseJudge()


def _run(spec: JobSpec) -> dict[str, Any]:
    from trainer.report import write_report
    from trainer.train import train
    from worker.model_loader import load_model

    plan = spec.evaluation
    indices = list(range(len(spec.samples)))
    train_idx, val_idx = indices, list[int]()
    if plan is not None:
        train_idx, val_idx = split_validation(
            indices, plan["validation_fraction"], plan["max_validation"], VALIDATION_SEED
        )
    if not train_idx:
        raise ValueError("no samples left to train on after holding out the validation split")
    train_samples = [spec.samples[i] for i in train_idx]
    flags = [bool(spec.scores[i]["flagged"]) for i in train_idx]
    out_dir = artifact_dir(spec.job_id)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # an earlier attempt's partial files
    out_dir.mkdir(parents=True)

    loaded = load_model(spec.model)
    base_name = spec.model or BUNDLED_BASE_NAME
    evaluation: dict[str, Any] = {"base": None, "tuned": None}
    sets: list[PromptSet] = []
    fidelity: list[tuple[str, str]] = []
    if plan is not None:
        sets = _safety_sets(plan)
        for i in val_idx:
            try:
                fidelity.append(question_and_reference(spec.samples[i]))
            except ValueError:
                continue  # e.g. an instruction-only sample: no question to ask
        judge = _judge(plan)
        _set_phase(
            spec.job_id,
            "evaluating_base",
            "evaluating the base model",
            safety_sets=[s.name for s in sets],
            prompts=sum(len(s) for s in sets),
            validation=len(fidelity),
        )
        evaluation["base"] = _evaluate(loaded, spec, plan, sets, judge, fidelity, "base")

    config = spec.config
    _set_phase(
        spec.job_id,
        "training",
        "training",
        samples=len(train_samples),
        flagged=sum(flags),
        method=config.method,
        lora=config.lora is not None,
    )
    trained = train(
        loaded.model,
        loaded.tokenizer,
        train_samples,
        flags,
        spec.prompts,
        config,
        out_dir,
        base_model_name=base_name,
        on_step=_on_step(spec.job_id),
        should_stop=lambda: _cancelled(spec.job_id),
    )
    if trained.stopped:
        raise JobCancelled
    if plan is not None:
        _set_phase(spec.job_id, "evaluating_tuned", "evaluating the fine-tuned model")
        loaded.model = trained.model
        evaluation["tuned"] = _evaluate(loaded, spec, plan, sets, judge, fidelity, "tuned")

    _set_phase(spec.job_id, "reporting", "writing the report and the archive")
    result = {
        "base_model": base_name,
        "num_train": len(train_samples),
        "num_validation": len(val_idx),
        "num_flagged": sum(flags),
        "num_kl_samples": trained.num_kl_samples,
        "steps": trained.steps,
        "final": {k: trained.final.get(k) for k in ("loss", "ce", "kl")},
        "evaluation": _summary(evaluation) if plan is not None else None,
    }
    report = {
        "job": {"id": spec.job_id, "role": spec.prompts.name, **result},
        "scoring": _scoring_section(spec),
        "training": {
            "history": [_history_row(r) for r in trained.history],
            "config": config.to_dict(),
        },
        "evaluation": evaluation if plan is not None else None,
    }
    write_report(out_dir, report)
    saved = trained.adapter_dir or trained.model_dir
    assert saved is not None
    name = archive_name(config.to_dict())
    result["archive"] = {"name": name, "bytes": _archive(saved, out_dir / name)}
    shutil.rmtree(saved)  # the archive is what is served; keep one copy
    del trained, loaded
    return result


def _evaluate(
    loaded: Any,
    spec: JobSpec,
    plan: dict[str, Any],
    sets: list[PromptSet],
    judge: Judge,
    fidelity: list[tuple[str, str]],
    which: str,
) -> dict[str, Any]:
    from trainer.evaluate import evaluate_model

    result = evaluate_model(
        loaded.model,
        loaded.tokenizer,
        spec.prompts,
        sets,
        judge,
        fidelity,
        max_new_tokens=plan["max_new_tokens"],
        batch_size=plan["batch_size"],
        progress=_eval_progress(spec.job_id, which),
    )
    return result.to_dict()


def _summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers per model: refusal rate per safety set and ROUGE-L."""
    out: dict[str, Any] = {}
    for which, result in evaluation.items():
        if result is None:
            continue
        fidelity = result.get("fidelity")
        out[which] = {
            "refusal_rate": {s["name"]: s["refusal_rate"] for s in result["safety"]},
            "rouge_l": None if fidelity is None else fidelity["rouge_l"],
        }
    return out


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    return {"steps": result["steps"], "final": result["final"], "evaluation": result["evaluation"]}


def _scoring_section(spec: JobSpec) -> dict[str, Any]:
    points = [[s["s_role"], s["s_unsafe"], bool(s["flagged"]), s.get("delta")] for s in spec.scores]
    flagged = sum(1 for p in points if p[2])
    return {
        "points": points,
        "margin": spec.margin,
        "flagged_fraction": flagged / len(points) if points else 0.0,
    }


def _history_row(record: dict[str, float]) -> dict[str, Any]:
    return {
        "step": int(record["step"]),
        "ce": record["ce"],
        # A step whose batch held no KL sample has no KL value, rather than a zero.
        "kl": record["kl"] if record.get("kl_samples", 0) > 0 else None,
        "loss": record["loss"],
    }


def _archive(source: Path, target: Path) -> int:
    """``source`` as a .tar.gz whose top directory is ``source``'s name; returns its size."""
    part = target.with_name(target.name + ".part")
    with tarfile.open(part, "w:gz") as tar:
        tar.add(source, arcname=source.name)
    part.replace(target)
    return target.stat().st_size


# --- lost workers ------------------------------------------------------------------------------


def reap_stale_jobs() -> int:
    """Fail running jobs whose worker stopped heartbeating (killed, out of memory, host lost)."""
    cutoff = utcnow() - timedelta(seconds=get_settings().stale_after_s)
    with session_scope() as session:
        stale = session.scalars(
            select(FineTuningJob)
            .where(FineTuningJob.status == JobStatus.RUNNING, FineTuningJob.heartbeat_at < cutoff)
            .with_for_update(skip_locked=True)
        ).all()
        for job in stale:
            fail(session, job.id, _lost(job, f"worker {job.worker} stopped responding"))
        return len(stale)


def recover_embedded() -> int:
    """At start-up of the embedded server: fail what the last process was running (it died
    with it), queue again what it had not started."""
    count = 0
    with session_scope() as session:
        for job in session.scalars(
            select(FineTuningJob).where(
                FineTuningJob.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
            )
        ):
            count += 1
            if job.status == JobStatus.RUNNING:
                fail(session, job.id, _lost(job, "the server stopped"))
                continue
            enqueue(session, job.id)
    return count


def _lost(job: FineTuningJob, why: str) -> str:
    where = job.phase if job.phase != "training" else f"training at step {job.step}"
    return (
        f"{why} during {where} (of {job.total_steps or '?'} steps); training does not resume: "
        "create a new job"
    )
