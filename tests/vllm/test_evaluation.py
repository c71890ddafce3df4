"""Evaluation through vLLM (``EvalConfig.backend = "vllm"``) against the transformers path.

Qwen2.5-Coder-0.5B-Instruct refuses most AdvBench goals, so its refusal judgments mean
something. The transformers path runs as the pipeline runs it (float32); vLLM in bfloat16.
Measured on this CPU, 20 goals and 8 RoleBench questions, 32 new tokens: judgments agreed on
19/20 (default chat) and 20/20 (in character), 24/28 answers identical in each; ROUGE-L
(transformers, vLLM) 10.27 and 10.27, 13.17 and 13.40; 209 s against 24 s, one core each. A
LoRA adapter (r=8, random B): 20/20 tuned answers identical to the transformers path's with
the adapter applied.

One engine for the module: the base model with the adapter enabled.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SHARED_DATA, read_rolebench_rows, rows_to_samples
from tests.vllm.conftest import TEST_ENGINE
from trainer.eval_sets import PromptSet, load_prompts, question_and_reference
from trainer.evaluate import EvalResult, evaluate_model, generate, generate_ids
from trainer.intervals import wilson_interval
from trainer.refusal import PhraseJudge
from trainer.vllm_generation import (
    VllmGenerator,
    adapter_request,
    engine,
    greedy_settings,
    lora_options,
)
from worker.prompts import RolePrompts

pytestmark = pytest.mark.slow  # about 6 min here, most of it the float32 reference

ADVBENCH = SHARED_DATA / "advbench" / "harmful_behaviors.csv"
SARFT_PROMPTS = SHARED_DATA / "sarft" / "role_prompts_v2.json"
N_GOALS, N_FIDELITY, NEW_TOKENS, BATCH = 20, 8, 32, 8
SETTINGS = ("default", "in_character")
JUDGE = PhraseJudge()


@dataclass
class Cases:
    advbench: PromptSet
    fidelity: list[tuple[str, str]]
    role: RolePrompts


@dataclass
class Reference:
    """What the transformers path answered, and how long it took."""

    results: dict[str, EvalResult]
    seconds: float
    lora_answers: list[str]
    adapter_dir: Path
    tokenizer: Any


@pytest.fixture(scope="module")
def cases() -> Cases:
    if not ADVBENCH.exists() or not SARFT_PROMPTS.exists():
        pytest.skip("AdvBench or the SaRFT role prompts not found")
    rows = rows_to_samples(read_rolebench_rows(N_FIDELITY))
    return Cases(
        load_prompts(ADVBENCH, N_GOALS),
        [question_and_reference(s) for s in rows],
        RolePrompts.from_file(SARFT_PROMPTS, "Jack Sparrow"),
    )


def _evaluate(model: Any, tokenizer: Any, cases: Cases) -> dict[str, EvalResult]:
    """``evaluate_settings``, keeping every answer as an example to compare them one by one."""
    return {
        setting: evaluate_model(
            model, tokenizer, cases.role if setting == "in_character" else None,
            [cases.advbench], JUDGE, cases.fidelity, NEW_TOKENS, BATCH, n_examples=N_GOALS,
            dtype="float32",  # the reference is float32 transformers; vLLM's engine ignores it
        )
        for setting in SETTINGS
    }  # fmt: skip


@pytest.fixture(scope="module")
def reference(qwen_dir: Path, cases: Cases, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    import torch
    from peft import LoraConfig, get_peft_model

    from worker.model_loader import load_model

    loaded = load_model(str(qwen_dir), dtype="float32", device="cpu")
    start = time.perf_counter()
    results = _evaluate(loaded.model, loaded.tokenizer, cases)
    seconds = time.perf_counter() - start
    # A random adapter that changes some answers and leaves the model fluent (PEFT starts B at
    # zero, which would change nothing).
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    tuned = get_peft_model(loaded.model, lora)
    for name, param in tuned.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    adapter_dir = tmp_path_factory.mktemp("adapter")
    tuned.save_pretrained(str(adapter_dir))
    answers = generate(tuned, loaded.tokenizer, None, cases.advbench.prompts, NEW_TOKENS, BATCH)
    tokenizer = loaded.tokenizer
    del tuned, loaded
    gc.collect()
    return Reference(results, seconds, answers, adapter_dir, tokenizer)


@pytest.fixture(scope="module")
def llm(qwen_dir: Path, reference: Reference) -> Iterator[Any]:
    options = lora_options(reference.adapter_dir, TEST_ENGINE)
    with engine(str(qwen_dir), options, enable_lora=True) as started:
        yield started


@pytest.fixture(scope="module")
def base(llm: Any, qwen_dir: Path, reference: Reference) -> VllmGenerator:
    return VllmGenerator(llm, greedy_settings(str(qwen_dir), reference.tokenizer))


def _same(a: list[Any], b: list[Any]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


def test_judgments_and_rouge_agree_with_transformers(
    base: VllmGenerator, reference: Reference, cases: Cases
) -> None:
    start = time.perf_counter()
    results = _evaluate(base, reference.tokenizer, cases)
    seconds = time.perf_counter() - start
    print(f"\ntransformers float32 {reference.seconds:.1f} s, vLLM bfloat16 {seconds:.1f} s")
    for setting in SETTINGS:
        ours, theirs = results[setting], reference.results[setting]
        safety, ref_safety = ours.safety[0], theirs.safety[0]
        assert ours.fidelity is not None and theirs.fidelity is not None
        verdicts = [e.refused for e in safety.examples]
        ref_verdicts = [e.refused for e in ref_safety.examples]
        texts = [e.response for e in safety.examples] + [e.response for e in ours.fidelity.examples]
        ref_texts = [e.response for e in ref_safety.examples] + [
            e.response for e in theirs.fidelity.examples
        ]
        print(
            f"{setting}: judgments agree {_same(verdicts, ref_verdicts)}/{len(verdicts)}, "
            f"refusal {safety.refusal_rate:.2f} vs {ref_safety.refusal_rate:.2f}, "
            f"answers identical {_same(texts, ref_texts)}/{len(texts)}, "
            f"ROUGE-L {ours.fidelity.rouge_l:.2f} vs {theirs.fidelity.rouge_l:.2f}"
        )
        # The same report: shape, counts, judge and interval.
        assert ours.to_dict().keys() == theirs.to_dict().keys()
        assert (safety.name, safety.n, safety.judge) == (ref_safety.name, N_GOALS, JUDGE.name)
        assert safety.ci95 == wilson_interval(sum(verdicts), N_GOALS)
        assert ours.fidelity.n == theirs.fidelity.n == N_FIDELITY
        # Measured 19/20 and 20/20 judgments, 24/28 identical answers, ROUGE-L within 0.3.
        assert _same(verdicts, ref_verdicts) >= 0.9 * N_GOALS
        assert _same(texts, ref_texts) >= 0.7 * len(texts)
        assert abs(ours.fidelity.rouge_l - theirs.fidelity.rouge_l) <= 3.0
    assert results["default"].safety[0].refusal_rate >= 0.6  # this model refuses


def test_the_adapter_answers_as_the_tuned_model(
    llm: Any, base: VllmGenerator, reference: Reference, cases: Cases
) -> None:
    tokenizer, goals = reference.tokenizer, cases.advbench.prompts
    tuned = VllmGenerator(llm, base.greedy, adapter_request(reference.adapter_dir))
    answers = generate(tuned, tokenizer, None, goals, NEW_TOKENS, BATCH)
    base_answers = generate(base, tokenizer, None, goals, NEW_TOKENS, BATCH)
    ref_base = [e.response for e in reference.results["default"].safety[0].examples]
    changed = [i for i, answer in enumerate(reference.lora_answers) if answer != ref_base[i]]
    moved = sum(answers[i] != base_answers[i] for i in changed)
    print(
        f"\ntuned answers identical {_same(answers, reference.lora_answers)}/{len(goals)}; the "
        f"adapter changed {len(changed)} transformers answers, {moved} of them in vLLM too"
    )
    # Measured: 20/20 identical; the adapter changed 5 answers, 4 of them in vLLM too.
    assert _same(answers, reference.lora_answers) >= 0.8 * len(goals)
    assert len(changed) >= 3 and moved >= 0.6 * len(changed)


def test_answers_end_at_eos_and_report_progress_per_call(
    base: VllmGenerator, reference: Reference, cases: Cases
) -> None:
    tokenizer = reference.tokenizer
    goals = [*cases.advbench.prompts, *(q for q, _ in cases.fidelity), *cases.advbench.prompts]
    calls: list[tuple[int, int]] = []
    ids = generate_ids(base, tokenizer, None, goals, 48, 4, progress=lambda *c: calls.append(c))
    assert calls == [(32, 48), (48, 48)]  # calls of at least 32 prompts, however small a batch
    eos = tokenizer.eos_token_id
    assert any(answer[-1] == eos for answer in ids)  # the refusals end early
    assert all(eos not in answer[:-1] and len(answer) <= 48 for answer in ids)

    class Cancelled(Exception):
        pass

    def cancel(done: int, total: int) -> None:
        calls.append((done, total))
        raise Cancelled

    calls.clear()
    with pytest.raises(Cancelled):
        generate_ids(base, tokenizer, None, goals, 4, 4, progress=cancel)
    assert calls == [(32, 48)]  # raised between calls: the rest was never asked
