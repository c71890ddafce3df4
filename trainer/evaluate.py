"""Evaluation before and after fine-tuning: safety refusal rates and role fidelity.

Answers are greedy (:mod:`trainer.generation`). Safety is the judged refusal rate on
harmful-prompt sets, with every prompt's verdict kept (base and tuned pair up) and, for sets that
carry harm categories, the rate per category; fidelity is ROUGE-L F1 (x100, Porter stemming, the
``rouge-score`` package, as the SaRFT code computes it) against held-out reference answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, NamedTuple

# The held-out split lives with the other evaluation data, generation in its own module; both
# are part of this API too.
from trainer.eval_sets import PromptSet, question_and_reference, split_validation
from trainer.generation import (
    Progress,
    TokenGenerator,
    generate,
    generate_ids,
    generation_model,
    render_question,
)
from trainer.intervals import wilson_interval
from trainer.refusal import Judge
from worker.prompts import RolePrompts

__all__ = [
    "CategoryResult", "EvalResult", "FidelityExample", "FidelityResult", "Progress",
    "SafetyExample", "SafetyResult", "TokenGenerator", "evaluate_model", "evaluate_settings",
    "generate", "generate_ids", "question_and_reference", "refusal_rate", "render_question",
    "rouge_l", "rouge_l_f1", "split_validation", "wilson_interval",
]  # fmt: skip


class SafetyExample(NamedTuple):
    prompt: str
    response: str
    refused: bool


class FidelityExample(NamedTuple):
    question: str
    reference: str
    response: str
    rouge_l: float


@dataclass(frozen=True, slots=True)
class CategoryResult:
    category: str
    n: int
    refusal_rate: float
    ci95: tuple[float, float]


@dataclass(frozen=True, slots=True)
class SafetyResult:
    name: str
    n: int
    refusal_rate: float
    """Fraction in [0, 1] of responses the judge rated safe (refused)."""
    judge: str
    examples: tuple[SafetyExample, ...]
    """The first few (prompt, response, refused) triples, in prompt-set order."""
    ci95: tuple[float, float] = (0.0, 1.0)
    """Wilson 95% interval of ``refusal_rate`` (its n prompts are a sample of harmful requests)."""
    verdicts: tuple[bool, ...] = ()
    """Every prompt's verdict in prompt-set order: the base and the tuned model answer the same
    prompts, so their verdicts pair up (:func:`trainer.comparison.compare_evaluations`)."""
    categories: tuple[CategoryResult, ...] | None = None
    """Refusal per harm category, in order of first appearance (sets that carry categories)."""


@dataclass(frozen=True, slots=True)
class FidelityResult:
    n: int
    rouge_l: float
    """Mean ROUGE-L F1 over the samples, x100."""
    examples: tuple[FidelityExample, ...]


@dataclass(frozen=True, slots=True)
class EvalResult:
    safety: tuple[SafetyResult, ...]
    fidelity: FidelityResult | None
    """None when there were no held-out samples."""

    def to_dict(self) -> dict[str, Any]:
        """What ``report.json`` holds under ``evaluation.base`` and ``evaluation.tuned``.

        Results become objects, examples too: {"prompt", "response", "refused"} and
        {"question", "reference", "response", "rouge_l"}.
        """
        return dict(_plain(self))


def _plain(value: Any) -> Any:
    """Dataclasses and named tuples as dicts, other tuples as lists, recursively."""
    if hasattr(value, "_asdict"):
        return {k: _plain(v) for k, v in value._asdict().items()}
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


# --- metrics -------------------------------------------------------------------------------------


def refusal_rate(
    model: Any,
    tokenizer: Any,
    role_prompts: RolePrompts | None,
    prompt_set: PromptSet,
    judge: Judge,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    *,
    n_examples: int = 5,
    progress: Progress | None = None,
) -> SafetyResult:
    """Generate an answer to every harmful prompt and judge it; ``role_prompts`` None asks in
    the model's default chat, otherwise in character."""
    prompts = prompt_set.prompts
    if not prompts:
        raise ValueError(f"prompt set {prompt_set.name!r} is empty")
    responses = generate(
        model, tokenizer, role_prompts, prompts, max_new_tokens, batch_size, progress=progress,
        system=prompt_set.system,
    )  # fmt: skip
    verdicts = [
        judge.judge(*prompt_set.judged(p, r)) for p, r in zip(prompts, responses, strict=True)
    ]
    examples = tuple(map(SafetyExample, prompts[:n_examples], responses, verdicts))
    refused = sum(verdicts)
    return SafetyResult(
        prompt_set.name,
        len(verdicts),
        refused / len(verdicts),
        judge.name,
        examples,
        wilson_interval(refused, len(verdicts)),
        tuple(verdicts),
        None if prompt_set.categories is None else by_category(prompt_set.categories, verdicts),
    )


def by_category(categories: Sequence[str], verdicts: Sequence[bool]) -> tuple[CategoryResult, ...]:
    """Refusal rate (and Wilson interval) per category, in order of first appearance."""
    counts: dict[str, list[int]] = {}
    for category, refused in zip(categories, verdicts, strict=True):
        n_refused = counts.setdefault(category, [0, 0])
        n_refused[0] += 1
        n_refused[1] += refused
    return tuple(
        CategoryResult(category, n, refused / n, wilson_interval(refused, n))
        for category, (n, refused) in counts.items()
    )


def rouge_l_f1(response: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1] with the Porter stemmer (``rouge-score``'s tokenizer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(scorer.score(reference, response)["rougeL"].fmeasure)


def rouge_l(
    model: Any,
    tokenizer: Any,
    role_prompts: RolePrompts | None,
    questions: Sequence[str],
    references: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    *,
    n_examples: int = 5,
    progress: Progress | None = None,
) -> FidelityResult:
    """Mean ROUGE-L F1 (x100) of the answers against the reference answers (in character, or in
    the default chat when ``role_prompts`` is None)."""
    if len(questions) != len(references):
        raise ValueError(f"{len(questions)} questions but {len(references)} references")
    if not questions:
        raise ValueError("no questions to evaluate")
    responses = generate(
        model, tokenizer, role_prompts, questions, max_new_tokens, batch_size, progress=progress
    )
    scores = [rouge_l_f1(r, ref) for r, ref in zip(responses, references, strict=True)]
    percent = [100.0 * x for x in scores]
    examples = tuple(map(FidelityExample, questions[:n_examples], references, responses, percent))
    return FidelityResult(len(scores), sum(percent) / len(percent), examples)


# --- the whole evaluation ------------------------------------------------------------------------


def evaluate_model(
    model: Any,
    tokenizer: Any,
    role_prompts: RolePrompts | None,
    safety_sets: Sequence[PromptSet],
    judge: Judge,
    fidelity: Sequence[tuple[str, str]] = (),
    max_new_tokens: int = 128,
    batch_size: int = 8,
    *,
    n_examples: int = 5,
    progress: Callable[[str, int, int], None] | None = None,
    dtype: str = "auto",
) -> EvalResult:
    """Every safety set, then fidelity on (question, reference) pairs; same for base and tuned.

    ``progress(stage, done, total)`` names the stage: a prompt set's name or "fidelity". It
    runs between batches, so raising from it (e.g. on a cancelled job) stops the evaluation.
    ``dtype``: what the model answers in (:func:`trainer.generation.resolved_dtype`).
    """
    with generation_model(model, dtype) as answering:
        return _evaluate(
            answering, tokenizer, role_prompts, safety_sets, judge, fidelity, max_new_tokens,
            batch_size, n_examples, progress,
        )  # fmt: skip


def _evaluate(
    model: Any,
    tokenizer: Any,
    role_prompts: RolePrompts | None,
    safety_sets: Sequence[PromptSet],
    judge: Judge,
    fidelity: Sequence[tuple[str, str]],
    max_new_tokens: int,
    batch_size: int,
    n_examples: int,
    progress: Callable[[str, int, int], None] | None,
) -> EvalResult:

    def stage(name: str) -> Progress | None:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    safety = tuple(
        refusal_rate(
            model, tokenizer, role_prompts, prompt_set, judge, max_new_tokens, batch_size,
            n_examples=n_examples, progress=stage(prompt_set.name),
        )
        for prompt_set in safety_sets
    )  # fmt: skip
    result = None
    if fidelity:
        questions, references = zip(*fidelity, strict=True)
        result = rouge_l(
            model, tokenizer, role_prompts, questions, references, max_new_tokens, batch_size,
            n_examples=n_examples, progress=stage("fidelity"),
        )  # fmt: skip
    return EvalResult(safety=safety, fidelity=result)


def evaluate_settings(
    model: Any,
    tokenizer: Any,
    role_prompts: RolePrompts,
    settings: Sequence[str],
    safety_sets: Sequence[PromptSet],
    judge: Judge,
    fidelity: Sequence[tuple[str, str]] = (),
    max_new_tokens: int = 128,
    batch_size: int = 8,
    *,
    n_examples: int = 5,
    progress: Callable[[str, int, int], None] | None = None,
    dtype: str = "auto",
) -> dict[str, EvalResult]:
    """:func:`evaluate_model` once per setting, by setting name: "default" asks in the model's
    own chat (no system message, as the authors evaluate), "in_character" under the role
    prompt. ``progress`` stages are prefixed with the setting ("default advbench"). The model
    is copied into ``dtype`` once for every setting."""

    def staged(setting: str) -> Callable[[str, int, int], None] | None:
        if progress is None:
            return None
        report = progress

        def setting_progress(stage: str, done: int, total: int) -> None:
            report(f"{setting} {stage}", done, total)

        return setting_progress

    with generation_model(model, dtype) as answering:
        return {
            setting: evaluate_model(
                answering,
                tokenizer,
                role_prompts if setting == "in_character" else None,
                safety_sets,
                judge,
                fidelity,
                max_new_tokens,
                batch_size,
                n_examples=n_examples,
                progress=staged(setting),
                dtype=dtype,  # already applied: the copy is in it, and a float32 model stays
            )
            for setting in settings
        }
