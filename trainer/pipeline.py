"""A fine-tuning run from start to end, with no database and no queue: the host feeds it plain
data and callbacks (:class:`trainer.progress.RunHooks`) and stores what it returns.

The steps: hold out a validation split, load the model, evaluate it (base), train with the SaRFT
loss, evaluate the trained model, write the report and archive the adapter (or the weights) into
``out_dir``. A run stopped by ``should_stop`` raises :class:`RunCancelled` and publishes nothing.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trainer.artifacts import archive_name, write_archive
from trainer.config import EvalConfig, JudgeSettings
from trainer.eval_sets import PromptSet, load_prompts, question_and_reference, split_validation
from trainer.evaluate import evaluate_settings
from trainer.refusal import Judge, LLMJudge, PhraseJudge
from trainer.report import (
    EvaluationSection,
    build_report,
    evaluation_summary,
    scoring_section,
    write_report,
)
from trainer.run_spec import EvalResources, Phase, RunCancelled, RunHooks, RunInputs
from trainer.train import TrainResult, fine_tune
from worker.formats import Sample
from worker.model_loader import load_model
from worker.packaged_models import base_model_id

VALIDATION_SEED = 0  # the held-out split depends only on the dataset size and this seed
CANCEL_CHECK_S = 2.0  # how often evaluation asks should_stop (it may query a database)


def run_fine_tuning(
    inputs: RunInputs,
    out_dir: Path,
    *,
    resources: EvalResources | None = None,
    hooks: RunHooks | None = None,
) -> dict[str, Any]:
    """Run every step into ``out_dir`` (emptied first); return the run's summary."""
    hooks = hooks or RunHooks()
    train_idx, val_idx = _split(inputs)
    train_samples = [inputs.samples[i] for i in train_idx]
    flags = [bool(inputs.scores[i]["flagged"]) for i in train_idx]
    if out_dir.exists():
        shutil.rmtree(out_dir)  # an earlier attempt's partial files
    out_dir.mkdir(parents=True)

    loaded = load_model(inputs.model)
    evaluator = None
    evaluation: EvaluationSection | None = None
    if inputs.evaluation is not None:
        held_out = [inputs.samples[i] for i in val_idx]
        evaluator = _Evaluator(inputs, inputs.evaluation, resources or EvalResources(), held_out)
        _enter(hooks, Phase.EVALUATING_BASE, "evaluating the base model", **evaluator.describe())
        base = evaluator.run(loaded.model, loaded.tokenizer, "base", hooks)
        evaluation = {"base": base, "tuned": None}

    config = inputs.config
    _enter(
        hooks,
        Phase.TRAINING,
        "training",
        samples=len(train_samples),
        flagged=sum(flags),
        method=config.method,
        lora=config.lora is not None,
    )
    trained = fine_tune(
        loaded.model,
        loaded.tokenizer,
        train_samples,
        flags,
        inputs.prompts,
        config,
        out_dir,
        base_model_name=base_model_id(inputs.model),
        on_step=hooks.on_step,
        should_stop=hooks.should_stop,
    )
    if trained.stopped:
        raise RunCancelled
    if evaluator is not None and evaluation is not None:
        _enter(hooks, Phase.EVALUATING_TUNED, "evaluating the fine-tuned model")
        evaluation["tuned"] = evaluator.run(trained.model, loaded.tokenizer, "tuned", hooks)

    _enter(hooks, Phase.REPORTING, "writing the report and the archive")
    result = _summary(inputs, trained, len(train_samples), len(val_idx), sum(flags), evaluation)
    _publish(inputs, out_dir, trained, result, evaluation)
    return result


def _split(inputs: RunInputs) -> tuple[list[int], list[int]]:
    indices = list(range(len(inputs.samples)))
    train_idx, val_idx = indices, list[int]()
    plan = inputs.evaluation
    if plan is not None:
        train_idx, val_idx = split_validation(
            indices, plan.validation_fraction, plan.max_validation, VALIDATION_SEED
        )
    if not train_idx:
        raise ValueError("no samples left to train on after holding out the validation split")
    return train_idx, val_idx


def _enter(hooks: RunHooks, phase: Phase, message: str, **data: Any) -> None:
    hooks.on_phase(phase, message, data)
    if hooks.should_stop():
        raise RunCancelled


def _summary(
    inputs: RunInputs,
    trained: TrainResult,
    num_train: int,
    num_validation: int,
    num_flagged: int,
    evaluation: EvaluationSection | None,
) -> dict[str, Any]:
    return {
        "base_model": base_model_id(inputs.model),
        "num_train": num_train,
        "num_validation": num_validation,
        "num_flagged": num_flagged,
        "num_kl_samples": trained.num_kl_samples,
        "steps": trained.steps,
        "final": {k: trained.final.get(k) for k in ("loss", "ce", "kl")},
        "evaluation": None if evaluation is None else evaluation_summary(evaluation),
    }


def _publish(
    inputs: RunInputs,
    out_dir: Path,
    trained: TrainResult,
    result: dict[str, Any],
    evaluation: EvaluationSection | None,
) -> None:
    """Write the report, then the archive (recorded in ``result``) in place of the weights."""
    report = build_report(
        {"id": inputs.run_id, "role": inputs.prompts.name, **result},
        scoring_section(inputs.scores, inputs.margin),
        trained.history,
        inputs.config.to_dict(),
        evaluation,
    )
    write_report(out_dir, report)
    saved = trained.adapter_dir or trained.model_dir
    assert saved is not None
    name = archive_name(lora=inputs.config.lora is not None)
    result["archive"] = {"name": name, "bytes": write_archive(saved, out_dir / name)}
    shutil.rmtree(saved)  # the archive is what is served; keep one copy


class _Evaluator:
    """The same safety sets, judge and held-out questions for the base and the tuned model."""

    def __init__(
        self,
        inputs: RunInputs,
        plan: EvalConfig,
        resources: EvalResources,
        held_out: Sequence[Sample],
    ) -> None:
        self.plan, self.prompts = plan, inputs.prompts
        self.sets = _safety_sets(plan, resources.set_paths)
        self.fidelity: list[tuple[str, str]] = []
        for sample in held_out:
            try:
                self.fidelity.append(question_and_reference(sample))
            except ValueError:
                continue  # e.g. an instruction-only sample: no question to ask
        self.judge = _judge(plan.judge, resources.judge_api_key)

    def describe(self) -> dict[str, Any]:
        return {
            "safety_sets": [s.name for s in self.sets],
            "prompts": sum(len(s) for s in self.sets),
            "validation": len(self.fidelity),
            "settings": list(self.plan.settings),
        }

    def run(
        self, model: Any, tokenizer: Any, which: str, hooks: RunHooks
    ) -> dict[str, dict[str, Any]]:
        """Every setting's ``EvalResult.to_dict()``, by setting name."""
        last_check = time.monotonic()

        def progress(stage: str, done: int, total: int) -> None:
            nonlocal last_check
            hooks.on_generated(which, stage, done, total)
            # Raised between generation batches, so a cancel stops a long evaluation.
            if time.monotonic() - last_check >= CANCEL_CHECK_S:
                last_check = time.monotonic()
                if hooks.should_stop():
                    raise RunCancelled

        results = evaluate_settings(
            model,
            tokenizer,
            self.prompts,
            self.plan.settings,
            self.sets,
            self.judge,
            self.fidelity,
            max_new_tokens=self.plan.max_new_tokens,
            batch_size=self.plan.batch_size,
            progress=progress,
        )
        return {setting: result.to_dict() for setting, result in results.items()}


def _safety_sets(plan: EvalConfig, configured: Mapping[str, Path]) -> list[PromptSet]:
    sets = []
    for entry in plan.safety_sets:
        if entry.prompts is not None:
            sets.append(PromptSet(name=entry.name, prompts=entry.prompts[: plan.max_prompts]))
        elif entry.name in configured:
            sets.append(load_prompts(configured[entry.name], plan.max_prompts, name=entry.name))
        else:
            raise RuntimeError(f"safety set {entry.name!r} is not configured on this worker")
    return sets


def _judge(settings: JudgeSettings, api_key: str | None) -> Judge:
    if settings.kind == "llm":
        assert settings.url and settings.model  # JudgeSettings checks it
        return LLMJudge(settings.url, settings.model, api_key=api_key)
    return PhraseJudge()
