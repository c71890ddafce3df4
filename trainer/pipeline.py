"""A fine-tuning run from start to end, with no database and no queue: the host feeds it plain
data and callbacks (:class:`trainer.progress.RunHooks`) and stores what it returns.

The steps: hold out a validation split, load the model, evaluate it (base), train with the SaRFT
loss, evaluate the trained model, write the report and archive the adapter (or the weights) into
``out_dir``. With the "vllm" evaluation backend both evaluations run after training, in vLLM
(:mod:`trainer.vllm_generation`), once the training model is freed. A run stopped by
``should_stop`` raises :class:`RunCancelled` and publishes nothing.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoints, vllm_generation
from trainer.artifacts import archive_name, write_archive
from trainer.checkpoints import Checkpoint, CheckpointPolicy
from trainer.config import EvalConfig, JudgeSettings
from trainer.eval_sets import PromptSet, load_prompts, question_and_reference, split_validation
from trainer.evaluate import evaluate_settings
from trainer.jailbreaks import SOURCE_SET, is_jailbreak_set, jailbreak_set
from trainer.refusal import Judge, LLMJudge, PhraseJudge, RuleJudge
from trainer.report import (
    EvaluationSection,
    build_report,
    evaluation_summary,
    scoring_section,
    write_report,
)
from trainer.run_spec import (
    CheckpointSettings,
    EvalResources,
    Phase,
    RunCancelled,
    RunHooks,
    RunInputs,
)
from trainer.train import TrainResult, fine_tune
from worker.formats import Sample
from worker.model_loader import LoadedModel, load_model
from worker.packaged_models import base_model_id
from worker.vllm_engine import VllmEngineOptions

VALIDATION_SEED = 0  # the held-out split depends only on the dataset size and this seed
CANCEL_CHECK_S = 2.0  # how often evaluation asks should_stop (it may query a database)
BASE_EVALUATION = "base_evaluation.json"  # kept across a resume: the base model is the same


def run_fine_tuning(
    inputs: RunInputs,
    out_dir: Path,
    *,
    resources: EvalResources | None = None,
    hooks: RunHooks | None = None,
    checkpoint_settings: CheckpointSettings | None = None,
    resume: bool = False,
    accelerator: Any | None = None,
    vllm_options: VllmEngineOptions | None = None,
) -> dict[str, Any]:
    """Run every step into ``out_dir``; return the run's summary.

    A new run empties ``out_dir`` first. With ``resume`` (the host's earlier attempt died) the
    run keeps what that attempt left: its base evaluation and its newest checkpoint, from which
    training continues (see :func:`trainer.train.fine_tune`).

    With an ``accelerate.Accelerator`` of several processes, every process calls this: they
    train together (data parallel); the main one alone evaluates, reports and publishes, and
    the others return an empty summary once training ends. Only the main one's hooks matter.

    ``vllm_options`` start the engine of the "vllm" evaluation backend (default:
    ``VllmEngineOptions()``); without vLLM here such a run fails before it loads the model.
    """
    main = accelerator is None or accelerator.is_main_process
    hooks = hooks or RunHooks()
    in_vllm = inputs.evaluation is not None and inputs.evaluation.backend == "vllm"
    if in_vllm and main:
        vllm_generation.require_vllm(inputs.config, vllm_options)
    train_samples, train_flags, validation, validation_flags = _split(inputs)
    if main and out_dir.exists() and not resume:
        shutil.rmtree(out_dir)  # an earlier attempt's partial files
    if accelerator is not None:
        accelerator.wait_for_everyone()  # no process reads the directory while it is emptied
    out_dir.mkdir(parents=True, exist_ok=True)

    device = None if accelerator is None else str(accelerator.device)
    loaded = load_model(inputs.model, device=device)
    evaluator = None
    evaluation: EvaluationSection | None = None
    if inputs.evaluation is not None and main:
        evaluator = _Evaluator(inputs, inputs.evaluation, resources or EvalResources(), validation)
        saved_base = out_dir / BASE_EVALUATION
        base = None
        if resume and saved_base.is_file():
            base = json.loads(saved_base.read_text(encoding="utf-8"))
        elif not in_vllm:  # vLLM evaluates the base after training, beside the tuned model
            _enter(
                hooks, Phase.EVALUATING_BASE, "evaluating the base model", **evaluator.describe()
            )
            base = evaluator.run(loaded.model, loaded.tokenizer, "base", hooks)
            saved_base.write_text(json.dumps(base), encoding="utf-8")
        evaluation = {"base": base, "tuned": None}

    config = inputs.config
    _enter(
        hooks,
        Phase.TRAINING,
        "training",
        samples=len(train_samples),
        flagged=sum(train_flags),
        validation=len(validation),
        method=config.method,
        lora=config.lora is not None,
    )

    def on_checkpoint(saved: Checkpoint, deleted: list[Checkpoint]) -> None:
        hooks.on_checkpoint(saved.step, saved.metrics, saved.archive, [d.step for d in deleted])

    plan = checkpoint_settings or CheckpointSettings()
    trained = fine_tune(
        loaded.model,
        loaded.tokenizer,
        train_samples,
        train_flags,
        inputs.prompts,
        config,
        out_dir,
        base_model_name=base_model_id(inputs.model),
        validation=validation,
        validation_flags=validation_flags,
        checkpoint_policy=CheckpointPolicy(every=plan.every, keep=plan.keep),
        resume=resume,
        on_step=hooks.on_step,
        on_checkpoint=on_checkpoint,
        should_stop=hooks.should_stop,
        accelerator=accelerator,
    )
    if trained.stopped:
        raise RunCancelled
    if not main:
        return {}
    if evaluator is not None and evaluation is not None:
        if in_vllm:
            _evaluate_in_vllm(evaluator, evaluation, loaded, trained, out_dir, hooks, vllm_options)
        else:
            _enter(hooks, Phase.EVALUATING_TUNED, "evaluating the fine-tuned model")
            evaluation["tuned"] = evaluator.run(trained.model, loaded.tokenizer, "tuned", hooks)

    _enter(hooks, Phase.REPORTING, "writing the report and the archive")
    result = _summary(
        inputs, trained, len(train_samples), len(validation), sum(train_flags), evaluation
    )
    _publish(inputs, out_dir, trained, result, evaluation)
    checkpoints.finish(out_dir)
    return result


Split = tuple[list[Sample], list[bool], list[Sample], list[bool]]


def _split(inputs: RunInputs) -> Split:
    """Training samples and flags, validation samples and flags: a separate validation set
    when the inputs carry one, else a held-out fraction when the run evaluates."""

    def flags(scores: Sequence[Mapping[str, Any]], idx: Sequence[int]) -> list[bool]:
        return [bool(scores[i]["flagged"]) for i in idx]

    samples, scores = inputs.samples, inputs.scores
    if inputs.validation_samples is not None:
        every = range(len(samples))
        validation = list(inputs.validation_samples)
        return (
            list(samples),
            flags(scores, every),
            validation,
            flags(inputs.validation_scores, range(len(validation))),
        )
    train_idx, val_idx = _held_out(inputs)
    return (
        [samples[i] for i in train_idx],
        flags(scores, train_idx),
        [samples[i] for i in val_idx],
        flags(scores, val_idx),
    )


def _held_out(inputs: RunInputs) -> tuple[list[int], list[int]]:
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


def _evaluate_in_vllm(
    evaluator: _Evaluator,
    evaluation: EvaluationSection,
    loaded: LoadedModel,
    trained: TrainResult,
    out_dir: Path,
    hooks: RunHooks,
    options: VllmEngineOptions | None,
) -> None:
    """Evaluate the base (unless a resumed run has it) and the tuned model in vLLM, storing the
    base's evaluation as the transformers path does, for a later resume."""
    # vLLM loads its own copy of the weights: the training copies (and their optimizer's
    # leftovers) must be gone first, or a GPU holds both.
    loaded.model = trained.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    def run(which: str, model: Any) -> None:
        if which == "base":
            _enter(hooks, Phase.EVALUATING_BASE, "evaluating the base model",
                   **evaluator.describe())  # fmt: skip
            evaluation["base"] = base = evaluator.run(model, loaded.tokenizer, which, hooks)
            (out_dir / BASE_EVALUATION).write_text(json.dumps(base), encoding="utf-8")
        else:
            _enter(hooks, Phase.EVALUATING_TUNED, "evaluating the fine-tuned model")
            evaluation["tuned"] = evaluator.run(model, loaded.tokenizer, which, hooks)

    vllm_generation.evaluate_base_and_tuned(
        run,
        loaded.path,
        loaded.tokenizer,
        adapter_dir=trained.adapter_dir,
        model_dir=trained.model_dir,
        with_base=evaluation["base"] is None,
        options=options,
    )


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
        "resumed_from_step": trained.resumed_from,
        "trained_tokens": int(trained.final.get("trained_tokens", 0)),
        "final_validation": {
            k: trained.final.get(k) for k in ("valid_loss", "valid_ce", "valid_kl")
        }
        if "valid_loss" in trained.final
        else None,
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
        scoring_section(inputs.scores, inputs.margin, inputs.curation),
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
            "backend": self.plan.backend,
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
            dtype=self.plan.dtype,
        )
        return {setting: result.to_dict() for setting, result in results.items()}


def _safety_sets(plan: EvalConfig, configured: Mapping[str, Path]) -> list[PromptSet]:
    """Inline prompts, a configured file, or a jailbreak of the AdvBench goals (or of the
    inline prompts sent under a jailbreak's name)."""
    sets = []
    for entry in plan.safety_sets:
        if entry.prompts is not None:
            prompt_set = PromptSet(name=entry.name, prompts=entry.prompts[: plan.max_prompts])
        elif entry.name in configured:
            prompt_set = load_prompts(configured[entry.name], plan.max_prompts, name=entry.name)
        elif is_jailbreak_set(entry.name) and SOURCE_SET in configured:
            prompt_set = load_prompts(configured[SOURCE_SET], plan.max_prompts)
        else:
            raise RuntimeError(f"safety set {entry.name!r} is not configured on this worker")
        if is_jailbreak_set(entry.name) and entry.name not in configured:
            prompt_set = jailbreak_set(entry.name, prompt_set)
        sets.append(prompt_set)
    return sets


def _judge(settings: JudgeSettings, api_key: str | None) -> Judge:
    if settings.kind == "llm":
        assert settings.url and settings.model  # JudgeSettings checks it
        return LLMJudge(settings.url, settings.model, api_key=api_key)
    return PhraseJudge() if settings.kind == "phrases" else RuleJudge()
