"""The transformers scoring engine against a plain full-forward reference (SaRFT's RDS step)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import (
    ALL_CONDITIONS,
    model_cache_dir,
    question_answer,
    reference_label_ids,
    reference_single_turn,
    reference_span_sum,
    render_prompt,
    tokenize,
)
from worker.encoding import ChatEncoder, EncodingConfig
from worker.formats import Message, Sample, iter_samples
from worker.model_loader import LoadedModel, load_model
from worker.prompts import Condition, RolePrompts
from worker.results import SampleScores
from worker.scoring.base import ResponseLogprob
from worker.scoring.engine import score_samples
from worker.scoring.transformers_backend import TransformersScorer, _shifted_logprobs

TOL = 1e-4  # fp32: the engine must give the reference's mean log-probs to this
BUNDLED_ROWS = 4  # rows scored with the real model: 2 flagged, 2 not (each full forward ~0.5 s)

Means = dict[tuple[int, Condition], float]


def engine_scores(
    model: Any,
    encoder: ChatEncoder,
    samples: list[Sample],
    *,
    reuse_prefix: bool = True,
    batch_size: int = 16,
    compute_reference: bool = True,
    chunk_size: int = 256,
    fp32_head: bool = False,
) -> list[tuple[Sample, SampleScores]]:
    scorer = TransformersScorer(
        model, batch_size=batch_size, reuse_prefix=reuse_prefix, fp32_head=fp32_head
    )
    return list(
        score_samples(
            samples,
            encoder,
            scorer,
            compute_reference=compute_reference,
            chunk_size=chunk_size,
        )
    )


def by_condition(scores: SampleScores) -> dict[Condition, ResponseLogprob | None]:
    return {Condition.ROLE: scores.role, Condition.UNSAFE: scores.unsafe, Condition.REF: scores.ref}


def reference_means(
    model: Any,
    tokenizer: Any,
    prompts: RolePrompts,
    samples: list[Sample],
    *,
    supports_system: bool = True,
    config: EncodingConfig | None = None,
) -> Means:
    config = config or EncodingConfig()
    out: Means = {}
    for sample in samples:
        question, answer = question_answer(sample)
        for c in ALL_CONDITIONS:
            mean, _, _ = reference_single_turn(
                model,
                tokenizer,
                prompts.system_text(c),
                question,
                answer,
                supports_system=supports_system,
                max_prompt_tokens=config.max_prompt_tokens,
                max_response_tokens=config.max_response_tokens,
            )
            out[(sample.index, c)] = mean
    return out


def max_diff(results: list[tuple[Sample, SampleScores]], ref: Means) -> float:
    worst = 0.0
    for sample, scores in results:
        for c, lp in by_condition(scores).items():
            assert lp is not None
            worst = max(worst, abs(lp.mean - ref[(sample.index, c)]))
    return worst


def reference_flag(ref: Means, index: int) -> bool:
    return ref[(index, Condition.UNSAFE)] - ref[(index, Condition.ROLE)] > 0


# --- 1. real weights, real rows ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_rows(rolebench_rows: list[Sample]) -> list[Sample]:
    return rolebench_rows[:BUNDLED_ROWS]


@pytest.fixture(scope="module")
def bundled_reference(
    bundled_model: LoadedModel, sarft_prompts: RolePrompts, bundled_rows: list[Sample]
) -> Means:
    return reference_means(
        bundled_model.model, bundled_model.tokenizer, sarft_prompts, bundled_rows
    )


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 16])
@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_engine_matches_reference_on_bundled_model(
    bundled_model: LoadedModel,
    sarft_prompts: RolePrompts,
    bundled_rows: list[Sample],
    bundled_reference: Means,
    reuse_prefix: bool,
    batch_size: int,
) -> None:
    encoder = ChatEncoder(bundled_model.tokenizer, sarft_prompts)
    assert encoder.supports_system
    results = engine_scores(
        bundled_model.model,
        encoder,
        bundled_rows,
        reuse_prefix=reuse_prefix,
        batch_size=batch_size,
    )
    assert [s.index for s, _ in results] == [s.index for s in bundled_rows]
    worst = max_diff(results, bundled_reference)
    assert worst <= TOL, f"max |mean - reference| = {worst:.3g}"
    flags = [scores.flagged for _, scores in results]
    assert flags == [reference_flag(bundled_reference, s.index) for s in bundled_rows]
    assert set(flags) == {True, False}  # both outcomes are compared
    # Counts are the label lengths (answer + EOS, at most 128 tokens).
    for sample, scores in results:
        _, answer = question_answer(sample)
        n = len(reference_label_ids(bundled_model.tokenizer, answer))
        assert scores.role.count == scores.unsafe.count == n
        assert scores.ref is not None and scores.ref.count == n


@pytest.mark.slow
def test_conditions_give_different_scores(bundled_reference: Means) -> None:
    """Sanity check of the data: the conditions move the scores well above TOL."""
    indices = sorted({i for i, _ in bundled_reference})
    for i in indices:
        role, ref = bundled_reference[(i, Condition.ROLE)], bundled_reference[(i, Condition.REF)]
        assert abs(role - ref) > 10 * TOL, (i, role, ref)
    deltas = [
        bundled_reference[(i, Condition.UNSAFE)] - bundled_reference[(i, Condition.ROLE)]
        for i in indices
    ]
    assert max(abs(d) for d in deltas) > 10 * TOL, deltas


# --- 2. multi-turn -----------------------------------------------------------------------------


def multi_turn_reference(
    model: Any,
    tokenizer: Any,
    system: str,
    turns: list[tuple[str, str, bool]],
) -> tuple[float, int]:
    """Sum and count of the scored answers' log-probs, building the sequence turn by turn.

    ``turns`` holds (question, answer, scored). Turn k's prompt is the template rendering of the
    conversation so far with a generation prompt, minus the text already emitted (previous
    prompt text + answer + eos).
    """
    eos = tokenizer.eos_token
    history: list[dict[str, str]] = [{"role": "system", "content": system}]
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    emitted = ""
    for question, answer, scored in turns:
        history.append({"role": "user", "content": question})
        rendered = str(
            tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        )
        assert rendered.startswith(emitted)
        ids += tokenize(tokenizer, rendered[len(emitted) :])
        label = tokenize(tokenizer, answer + eos)
        if scored:
            spans.append((len(ids), len(ids) + len(label)))
        ids += label
        emitted = rendered + answer + eos
        history.append({"role": "assistant", "content": answer})
    return reference_span_sum(model, ids, spans), sum(e - s for s, e in spans)


def shortest_two(samples: list[Sample]) -> tuple[tuple[str, str], tuple[str, str]]:
    pairs = sorted((question_answer(s) for s in samples), key=lambda qa: len(qa[1]))
    return pairs[0], pairs[1]


def test_multi_turn_matches_turn_by_turn_reference(
    tiny_model: Any,
    bundled_tokenizer: Any,
    sarft_prompts: RolePrompts,
    rolebench_rows: list[Sample],
    tmp_path: Path,
) -> None:
    (q1, a1), (q2, a2) = shortest_two(rolebench_rows)
    both = Sample(
        index=0,
        line=1,
        messages=(
            Message("user", q1, scored=False),
            Message("assistant", a1),
            Message("user", q2, scored=False),
            Message("assistant", a2),
        ),
        raw={},
    )
    # The same conversation as OpenAI chat with the first answer as context only.
    path = tmp_path / "chat.jsonl"
    chat = {
        "messages": [
            {"role": "user", "content": q1},
            {"role": "assistant", "content": a1, "weight": 0},
            {"role": "user", "content": q2},
            {"role": "assistant", "content": a2},
        ]
    }
    path.write_text(json.dumps(chat) + "\n", encoding="utf-8")
    (parsed,) = list(iter_samples(path))
    assert [m.scored for m in parsed.messages] == [False, False, False, True]
    context_only = Sample(1, parsed.line, parsed.messages, parsed.raw)  # distinct index

    # The tiny random model over the bundled tokenizer: its chat template, with a system role.
    model, tokenizer = tiny_model, bundled_tokenizer
    expected: dict[tuple[int, Condition], tuple[float, int]] = {}
    for index, scored in ((0, (True, True)), (1, (False, True))):
        turns = [(q1, a1, scored[0]), (q2, a2, scored[1])]
        for c in ALL_CONDITIONS:
            expected[(index, c)] = multi_turn_reference(
                model, tokenizer, sarft_prompts.system_text(c), turns
            )
    n1, n2 = len(reference_label_ids(tokenizer, a1)), len(reference_label_ids(tokenizer, a2))
    assert expected[(0, Condition.ROLE)][1] == n1 + n2
    assert expected[(1, Condition.ROLE)][1] == n2  # a "weight": 0 answer is context only

    encoder = ChatEncoder(tokenizer, sarft_prompts)
    for reuse_prefix in (True, False):
        results = engine_scores(model, encoder, [both, context_only], reuse_prefix=reuse_prefix)
        assert [s.index for s, _ in results] == [0, 1]
        for sample, scores in results:
            for c, lp in by_condition(scores).items():
                assert lp is not None
                ref_sum, ref_count = expected[(sample.index, c)]
                where = (reuse_prefix, sample.index, c.value)
                assert lp.count == ref_count, where
                assert abs(lp.sum - ref_sum) <= TOL * ref_count, (*where, lp.sum, ref_sum)
                assert lp.mean == pytest.approx(lp.sum / lp.count)
                assert abs(lp.mean - ref_sum / ref_count) <= TOL, where


# --- 3. truncation -----------------------------------------------------------------------------


def test_long_answer_is_cut_to_128_tokens(
    tiny_model: Any,
    bundled_tokenizer: Any,
    sarft_prompts: RolePrompts,
    rolebench_rows: list[Sample],
) -> None:
    # The tiny random model over the bundled tokenizer: its chat template, with a system role.
    model, tokenizer = tiny_model, bundled_tokenizer
    question, _ = question_answer(rolebench_rows[0])
    long_answer = " ".join(question_answer(s)[1] for s in rolebench_rows[:4])
    assert len(tokenize(tokenizer, long_answer + tokenizer.eos_token)) > 128
    sample = Sample(
        0,
        1,
        (Message("user", question, scored=False), Message("assistant", long_answer)),
        {},
    )
    encoder = ChatEncoder(tokenizer, sarft_prompts)
    for c in ALL_CONDITIONS:
        seq = encoder.encode(sample, c)
        assert seq.truncated
        assert seq.num_response_tokens == 128
        (start, end) = seq.response_spans[0]
        assert end == len(seq.token_ids)
        assert seq.token_ids[start:end] == reference_label_ids(tokenizer, long_answer)

    expected = {}
    for c in ALL_CONDITIONS:
        ref_mean, ref_count, _ = reference_single_turn(
            model, tokenizer, sarft_prompts.system_text(c), question, long_answer
        )
        assert ref_count == 128
        expected[c] = ref_mean
    for reuse_prefix in (True, False):
        ((_, scores),) = engine_scores(model, encoder, [sample], reuse_prefix=reuse_prefix)
        assert scores.truncated
        for c, lp in by_condition(scores).items():
            assert lp is not None
            assert lp.count == 128
            assert abs(lp.mean - expected[c]) <= TOL, (reuse_prefix, c, lp.mean, expected[c])


def test_short_prompt_limit_keeps_first_prompt_tokens(
    tiny_model: Any,
    bundled_tokenizer: Any,
    sarft_prompts: RolePrompts,
    rolebench_rows: list[Sample],
) -> None:
    # The tiny random model over the bundled tokenizer: its chat template, with a system role.
    model, tokenizer = tiny_model, bundled_tokenizer
    config = EncodingConfig(max_prompt_tokens=40)
    samples = rolebench_rows[:3]
    encoder = ChatEncoder(tokenizer, sarft_prompts, config)
    for sample in samples:
        question, answer = question_answer(sample)
        for c in (Condition.ROLE, Condition.UNSAFE):
            seq = encoder.encode(sample, c)
            text = render_prompt(tokenizer, sarft_prompts.system_text(c), question, True)
            full = tokenize(tokenizer, text)
            assert len(full) > 40
            assert seq.truncated
            assert seq.token_ids[:40] == full[:40]
            assert seq.response_spans == ((40, len(seq.token_ids)),)
            assert seq.token_ids[40:] == reference_label_ids(tokenizer, answer)
            assert seq.shared_len < 40
    ref = reference_means(model, tokenizer, sarft_prompts, samples, config=config)
    # With 40 prompt tokens the role and unsafe prefixes are the same tokens (the unsafe prompt
    # starts with the role prompt): the prefix cache must cope with that.
    assert (
        encoder.prefixes[Condition.ROLE].token_ids == encoder.prefixes[Condition.UNSAFE].token_ids
    )
    for reuse_prefix in (False, True):
        results = engine_scores(model, encoder, samples, reuse_prefix=reuse_prefix)
        worst = max_diff(results, ref)
        assert worst <= TOL, f"reuse_prefix={reuse_prefix}: max |mean - reference| = {worst:.3g}"
        for sample, scores in results:
            assert scores.truncated
            assert scores.flagged == reference_flag(ref, sample.index)


# --- 4. a template without a system role ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_reference(
    tiny_model: Any, tiny_tokenizer: Any, sarft_prompts: RolePrompts, rolebench_rows: list[Sample]
) -> Means:
    return reference_means(
        tiny_model, tiny_tokenizer, sarft_prompts, rolebench_rows, supports_system=False
    )


@pytest.mark.parametrize("batch_size", [1, 16])
@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_system_less_template_matches_reference(
    tiny_model: Any,
    tiny_tokenizer: Any,
    sarft_prompts: RolePrompts,
    rolebench_rows: list[Sample],
    tiny_reference: Means,
    reuse_prefix: bool,
    batch_size: int,
) -> None:
    encoder = ChatEncoder(tiny_tokenizer, sarft_prompts)
    assert encoder.supports_system is False
    results = engine_scores(
        tiny_model, encoder, rolebench_rows, reuse_prefix=reuse_prefix, batch_size=batch_size
    )
    worst = max_diff(results, tiny_reference)
    assert worst <= TOL, f"max |mean - reference| = {worst:.3g}"
    for sample, scores in results:
        assert scores.flagged == reference_flag(tiny_reference, sample.index)


@pytest.mark.parametrize("reuse_prefix", [False, True])
def test_profile_longer_than_prompt_limit(
    tiny_model: Any, tiny_tokenizer: Any, rolebench_rows: list[Sample], reuse_prefix: bool
) -> None:
    """A profile longer than max_prompt_tokens: every prompt is its first 512 tokens.

    The role and unsafe prompts then share all 512 tokens, so both conditions' prefixes are
    the same token ids under different keys.
    """
    profile = " ".join(question_answer(s)[1] for s in rolebench_rows)
    prompts = RolePrompts.from_profile("Jack Sparrow", profile)
    samples = rolebench_rows[:3]
    encoder = ChatEncoder(tiny_tokenizer, prompts)
    assert len(encoder.prefixes[Condition.ROLE].token_ids) == 512
    assert (
        encoder.prefixes[Condition.ROLE].token_ids == encoder.prefixes[Condition.UNSAFE].token_ids
    )
    ref = reference_means(tiny_model, tiny_tokenizer, prompts, samples, supports_system=False)
    results = engine_scores(tiny_model, encoder, samples, reuse_prefix=reuse_prefix)
    worst = max_diff(results, ref)
    assert worst <= TOL, f"max |mean - reference| = {worst:.3g}"
    for _, scores in results:
        assert scores.truncated


def test_bf16_scoring_projects_and_normalises_in_fp32(tiny_model: Any) -> None:
    """fp32_head: the vocabulary projection and log-softmax of bf16 hidden states in fp32,
    from an fp32 copy of the output embedding; the model itself stays bf16."""
    bf16 = copy.deepcopy(tiny_model).to(torch.bfloat16)
    scorer = TransformersScorer(bf16, fp32_head=True)
    weight = bf16.get_output_embeddings().weight
    assert scorer.head_weight.dtype == torch.float32 and weight.dtype == torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, weight.shape[1], generator=generator).to(torch.bfloat16)
    labels = torch.randint(0, weight.shape[0], (64,), generator=generator)
    logits = hidden.float() @ weight.float().t()
    exact = torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    with torch.inference_mode():
        fp32_head = scorer._label_logprobs(hidden, labels)
        bf16_head = TransformersScorer(bf16)._label_logprobs(hidden, labels)
    fp32_error = float((fp32_head - exact).abs().max())
    bf16_error = float((bf16_head - exact).abs().max())
    assert fp32_error <= 1e-4, fp32_error
    assert bf16_error > 10 * fp32_error, (bf16_error, fp32_error)


def test_tiny_model_is_context_sensitive(tiny_reference: Means) -> None:
    """The tiny model's scores differ by condition far above TOL, so the test above has teeth."""
    gaps = [
        abs(tiny_reference[(i, Condition.ROLE)] - tiny_reference[(i, Condition.REF)])
        for i, _ in tiny_reference
    ]
    assert min(gaps) > 10 * TOL, gaps


def test_output_projection_paths_match_log_softmax(tiny_model: Any) -> None:
    """Label log-probs from vocabulary slices equal a full log-softmax, on both paths.

    Ordinary logits take the label-shifted sum; logits spread past exp's fp32 range
    (here the hidden states times 500) overflow it, and the exact path answers.
    """
    scorer = TransformersScorer(tiny_model)
    weight = scorer.lm_head.weight
    torch.manual_seed(7)
    hidden = torch.randn(40, weight.shape[1])
    labels = torch.randint(0, weight.shape[0], (40,))
    for h, tolerance in ((hidden, TOL), (hidden * 500, 1e-2)):
        with torch.inference_mode():
            want = torch.log_softmax(scorer.lm_head(h), -1).gather(1, labels[:, None])[:, 0]
            got = scorer._label_logprobs(h, labels)
        assert float((got - want).abs().max()) <= tolerance
    with torch.inference_mode():
        assert _shifted_logprobs(hidden, labels, weight) is not None
        assert _shifted_logprobs(hidden * 500, labels, weight) is None
        assert float(want.min()) < -100  # the second case really is out of range


# --- 5. score_samples ---------------------------------------------------------------------------


def test_score_samples_order_and_implicit_rewards(
    tiny_model: Any, tiny_tokenizer: Any, sarft_prompts: RolePrompts, rolebench_rows: list[Sample]
) -> None:
    encoder = ChatEncoder(tiny_tokenizer, sarft_prompts)
    # Shuffled input, several chunks: output must follow the input order exactly.
    samples = [rolebench_rows[i] for i in (5, 0, 9, 2, 7, 1, 11, 3)]
    progress: list[float] = []
    scorer = TransformersScorer(tiny_model, batch_size=4)
    with_ref = list(
        score_samples(samples, encoder, scorer, chunk_size=3, on_progress=progress.append)
    )
    assert [s for s, _ in with_ref] == samples
    assert [scores.index for _, scores in with_ref] == [s.index for s in samples]
    assert sum(progress) == pytest.approx(len(samples))

    # The same numbers as scoring each sample's sequences directly.
    direct_scorer = TransformersScorer(tiny_model, reuse_prefix=False)
    for sample, scores in with_ref:
        direct = direct_scorer.score(encoder.encode_all(sample, ALL_CONDITIONS))
        for got, want in zip((scores.role, scores.unsafe, scores.ref), direct, strict=True):
            assert got is not None
            assert got.count == want.count
            assert abs(got.mean - want.mean) <= TOL
        assert scores.ref is not None
        s_role, s_unsafe = scores.s_role, scores.s_unsafe
        assert s_role is not None and s_unsafe is not None
        assert s_role == pytest.approx(scores.role.mean - scores.ref.mean)
        assert s_unsafe == pytest.approx(scores.unsafe.mean - scores.ref.mean)
        assert scores.flagged == (s_unsafe - s_role > 0)
        assert scores.flagged == (scores.unsafe.mean - scores.role.mean > 0)

    without_ref = list(
        score_samples(
            samples, encoder, TransformersScorer(tiny_model), compute_reference=False, chunk_size=3
        )
    )
    assert [s for s, _ in without_ref] == samples
    for (_, a), (_, b) in zip(with_ref, without_ref, strict=True):
        assert b.ref is None and b.s_role is None and b.s_unsafe is None
        assert b.to_json()["ref"] is None
        assert abs(a.role.mean - b.role.mean) <= TOL
        assert abs(a.unsafe.mean - b.unsafe.mean) <= TOL
        assert a.flagged == b.flagged


# --- 6. bf16 --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bfloat16_close_to_float32(
    sarft_prompts: RolePrompts,
    bundled_rows: list[Sample],
    bundled_reference: Means,
) -> None:
    bf16 = load_model(cache_dir=model_cache_dir(), dtype="bfloat16", device="cpu")
    encoder = ChatEncoder(bf16.tokenizer, sarft_prompts)
    results = engine_scores(bf16.model, encoder, bundled_rows)
    worst = max_diff(results, bundled_reference)
    assert worst <= 0.6, f"bf16 vs fp32: max |mean difference| = {worst:.3f}"


# --- the second packaged model, a Qwen2 that refuses ---------------------------------------------


@pytest.fixture(scope="module")
def qwen_model() -> LoadedModel:
    from tests.conftest import model_cache_dir
    from worker.packaged_models import QWEN_CODER_05B

    if not QWEN_CODER_05B.installed():
        pytest.skip(f"{QWEN_CODER_05B.name} is not installed: {QWEN_CODER_05B.install_command}")
    return load_model(QWEN_CODER_05B.name, cache_dir=model_cache_dir())


@pytest.mark.slow
def test_qwen_scores_like_a_plain_forward_and_refuses(
    qwen_model: LoadedModel, sarft_prompts: RolePrompts, rolebench_rows: list[Sample]
) -> None:
    """The engine on another architecture (qwen2: biased q/k/v; as packaged, its output
    projection apart from the embedding): the reference's mean log-probs on two rows batched
    together; and the model refuses harmful requests in its default chat, the reason it is
    packaged (judged on the first 16 tokens, where the refusal phrases are)."""
    from tests.conftest import SHARED_DATA
    from trainer.eval_sets import load_prompts
    from trainer.evaluate import generate
    from trainer.refusal import PhraseJudge

    rows = rolebench_rows[:2]
    reference = reference_means(qwen_model.model, qwen_model.tokenizer, sarft_prompts, rows)
    encoder = ChatEncoder(qwen_model.tokenizer, sarft_prompts)
    results = engine_scores(qwen_model.model, encoder, rows, reuse_prefix=True, batch_size=16)
    assert max_diff(results, reference) <= TOL
    goals = load_prompts(SHARED_DATA / "advbench" / "harmful_behaviors.csv", 8).prompts
    answers = generate(qwen_model.model, qwen_model.tokenizer, None, goals, 16, 8)
    refused = sum(PhraseJudge().judge(g, a) for g, a in zip(goals, answers, strict=True))
    assert refused >= 3, answers  # measured: 4 of these 8, at 16 tokens as at 32


def test_borderline_samples_are_scored_again_by_the_checker(
    tiny_model: Any, tiny_tokenizer: Any, sarft_prompts: RolePrompts, rolebench_rows: list[Sample]
) -> None:
    """bf16 with an fp32 check: the samples whose fast difference lies within the band of the
    margin carry the exact scorer's role and unsafe scores (and so its flags), and keep the fast
    reference score; the others keep the fast ones."""
    encoder = ChatEncoder(tiny_tokenizer, sarft_prompts)
    fast = TransformersScorer(copy.deepcopy(tiny_model).to(torch.bfloat16))
    exact = TransformersScorer(tiny_model)

    def run(band: float) -> list[SampleScores]:
        return [
            s
            for _, s in score_samples(
                rolebench_rows, encoder, fast, checker=exact, check_band=band, margin=0.1
            )
        ]

    plain = run(0.0)
    distances = [abs(p.unsafe.mean - p.role.mean - 0.1) for p in plain]
    band = sorted(distances)[len(distances) // 2]  # about half the rows are near
    checked = run(band)
    reference = [s for _, s in score_samples(rolebench_rows, encoder, exact, margin=0.1)]
    near = [d < band for d in distances]
    assert 0 < sum(near) < len(near)  # the band splits the rows: both branches are exercised

    def flag_means(s: SampleScores) -> list[float]:
        return [s.role.mean, s.unsafe.mean]

    for p, c, r, is_near in zip(plain, checked, reference, near, strict=True):
        if is_near:  # the exact scorer's numbers (batched with other rows: to rounding)
            assert flag_means(c) == pytest.approx(flag_means(r), abs=1e-6)
            # The reference pass keeps the fast score, which is not the exact one.
            assert c.flagged == r.flagged and c.ref == p.ref
            assert p.ref is not None and r.ref is not None
            assert p.ref.mean != pytest.approx(r.ref.mean, abs=1e-6)
        else:
            assert c == p
    assert [flag_means(s) for s in run(float("inf"))] == [
        pytest.approx(flag_means(r), abs=1e-6) for r in reference
    ]
