"""Evaluation before and after fine-tuning: safety refusal rates and role fidelity.

Generation is greedy and batched with left padding. The system prompt is rendered the way
:mod:`worker.encoding` renders it for scoring and training: as a system message, or prepended to
the user turn (``system + " " + question``) when the chat template has no system role. Safety is
the judged refusal rate on harmful-prompt sets; fidelity is ROUGE-L F1 (x100, Porter stemming,
the ``rouge-score`` package, as the SaRFT code computes it) against held-out reference answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

# The held-out split lives with the other evaluation data; it is part of this API too.
from trainer.eval_sets import PromptSet, question_and_reference, split_validation
from trainer.intervals import wilson_interval
from trainer.refusal import Judge
from worker.encoding import template_supports_system
from worker.prompts import Condition, RolePrompts

__all__ = [
    "EvalResult", "FidelityExample", "FidelityResult", "SafetyExample", "SafetyResult",
    "TokenGenerator", "evaluate_model", "evaluate_settings", "generate", "generate_ids",
    "question_and_reference", "refusal_rate", "render_question", "rouge_l", "rouge_l_f1",
    "split_validation", "wilson_interval",
]  # fmt: skip

Progress = Callable[[int, int], None]
"""Called after each generated batch with (prompts done, prompts in total)."""


@runtime_checkable
class TokenGenerator(Protocol):
    """An engine that stands in for the model everywhere in this module (vLLM's:
    :mod:`trainer.vllm_generation`): it gets the prompts tokenized here, so both paths see the
    same input, and returns each greedy answer's new token ids as :func:`generate_ids` does."""

    def generate_ids(
        self,
        encoded: Sequence[list[int]],
        max_new_tokens: int,
        batch_size: int,
        progress: Progress | None,
    ) -> list[list[int]]: ...


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


# --- generation ----------------------------------------------------------------------------------


def render_question(
    tokenizer: Any, system: str | None, question: str, supports_system: bool
) -> str:
    """The chat prompt for one question, ending with the assistant's generation prompt.

    ``system`` None sends the question alone, so the template's own default (if any) applies.
    """
    if system is None:
        messages = [{"role": "user", "content": question}]
    elif supports_system:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    else:
        messages = [{"role": "user", "content": system + " " + question}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _greedy_config(model: Any, max_new_tokens: int, pad_id: int, eos_id: int) -> Any:
    """The model's generation config with sampling switched off (and no warnings about it)."""
    from transformers import GenerationConfig

    config = GenerationConfig.from_dict(model.generation_config.to_dict())
    config.do_sample, config.num_beams = False, 1
    config.temperature = config.top_p = config.top_k = None
    config.max_new_tokens, config.max_length = max_new_tokens, None
    config.pad_token_id = pad_id
    if config.eos_token_id is None:
        config.eos_token_id = eos_id
    return config


def _encode(tokenizer: Any, system: str | None, questions: Sequence[str]) -> list[list[int]]:
    """Rendered prompts tokenized like the encoder does (the template supplies the specials)."""
    supports_system = template_supports_system(tokenizer)
    texts = [render_question(tokenizer, system, q, supports_system) for q in questions]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def _left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def _until_eos(ids: list[int], eos: int | list[int] | None) -> list[int]:
    stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    end = next((n + 1 for n, token in enumerate(ids) if token in stops), len(ids))
    return ids[:end]


@torch.inference_mode()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: RolePrompts | None,
    questions: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    *,
    condition: Condition = Condition.ROLE,
    progress: Progress | None = None,
) -> list[list[int]]:
    """The new token ids of each question's greedy answer, without padding (EOS kept).

    ``model`` is a transformers model or a :class:`TokenGenerator`.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be at least 1")
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    encoded = _encode(
        tokenizer, None if prompts is None else prompts.system_text(condition), questions
    )
    if isinstance(model, TokenGenerator):
        return model.generate_ids(encoded, max_new_tokens, batch_size, progress)
    config = _greedy_config(model, max_new_tokens, pad_id, eos_id)
    device = next(model.parameters()).device
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    out: list[list[int]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()  # no dropout, even when called in the middle of training
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = _left_pad([encoded[i] for i in chunk], pad_id)
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
            for row, i in enumerate(chunk):
                out[i] = _until_eos(generated[row, ids.shape[1] :].tolist(), config.eos_token_id)
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    return out


def generate(
    model: Any,
    tokenizer: Any,
    prompts: RolePrompts | None,
    questions: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    *,
    condition: Condition = Condition.ROLE,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy answers to ``questions`` under the role's ``condition`` system prompt.

    Returns only the new text, special tokens skipped and surrounding whitespace stripped.
    """
    ids = generate_ids(
        model, tokenizer, prompts, questions, max_new_tokens, batch_size, condition=condition,
        progress=progress,
    )  # fmt: skip
    return [str(tokenizer.decode(x, skip_special_tokens=True)).strip() for x in ids]


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
        model, tokenizer, role_prompts, prompts, max_new_tokens, batch_size, progress=progress
    )
    verdicts = [judge.judge(p, r) for p, r in zip(prompts, responses, strict=True)]
    examples = tuple(map(SafetyExample, prompts[:n_examples], responses, verdicts))
    refused = sum(verdicts)
    return SafetyResult(
        prompt_set.name,
        len(verdicts),
        refused / len(verdicts),
        judge.name,
        examples,
        wilson_interval(refused, len(verdicts)),
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
) -> EvalResult:
    """Every safety set, then fidelity on (question, reference) pairs; same for base and tuned.

    ``progress(stage, done, total)`` names the stage: a prompt set's name or "fidelity". It
    runs between batches, so raising from it (e.g. on a cancelled job) stops the evaluation.
    """

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
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, EvalResult]:
    """:func:`evaluate_model` once per setting, by setting name: "default" asks in the model's
    own chat (no system message, as the authors evaluate), "in_character" under the role
    prompt. ``progress`` stages are prefixed with the setting ("default advbench")."""

    def staged(setting: str) -> Callable[[str, int, int], None] | None:
        if progress is None:
            return None
        report = progress

        def setting_progress(stage: str, done: int, total: int) -> None:
            report(f"{setting} {stage}", done, total)

        return setting_progress

    return {
        setting: evaluate_model(
            model,
            tokenizer,
            role_prompts if setting == "in_character" else None,
            safety_sets,
            judge,
            fidelity,
            max_new_tokens,
            batch_size,
            progress=staged(setting),
        )
        for setting in settings
    }
