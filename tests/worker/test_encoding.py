"""ChatEncoder: token sequences, response spans and shared prefixes per scoring condition."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import (
    ALL_CONDITIONS,
    question_answer,
    reference_label_ids,
    reference_prompt_ids,
    tokenize,
)
from worker.encoding import ChatEncoder, EncodingConfig, EncodingError, template_supports_system
from worker.formats import Message, Sample
from worker.prompts import Condition, RolePrompts


@pytest.fixture(params=["bundled", "no_system"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    name = "bundled_tokenizer" if request.param == "bundled" else "tiny_tokenizer"
    return request.getfixturevalue(name)


def test_system_support_is_detected(bundled_tokenizer: Any, tiny_tokenizer: Any) -> None:
    assert template_supports_system(bundled_tokenizer)
    assert not template_supports_system(tiny_tokenizer)
    prompts = RolePrompts("X", "role", "unsafe")
    assert ChatEncoder(bundled_tokenizer, prompts).supports_system is True
    assert ChatEncoder(tiny_tokenizer, prompts).supports_system is False


def test_sequences_match_the_reference_tokens(
    tokenizer: Any, sarft_prompts: RolePrompts, rolebench_rows: list[Sample]
) -> None:
    encoder = ChatEncoder(tokenizer, sarft_prompts)
    for sample in rolebench_rows:
        question, answer = question_answer(sample)
        label = reference_label_ids(tokenizer, answer)
        assert label[-1] == tokenizer.eos_token_id
        for c in ALL_CONDITIONS:
            seq = encoder.encode(sample, c)
            prompt = reference_prompt_ids(
                tokenizer,
                sarft_prompts.system_text(c),
                question,
                supports_system=encoder.supports_system,
            )
            assert seq.token_ids == prompt + label, (sample.index, c)
            # The response span points at answer + EOS, and at nothing else.
            assert seq.response_spans == ((len(prompt), len(prompt) + len(label)),)
            start, end = seq.response_spans[0]
            assert seq.token_ids[start:end] == label
            assert tokenizer.decode(seq.token_ids[start:end]) == answer + tokenizer.eos_token
            assert seq.num_response_tokens == len(label)
            assert not seq.truncated


def test_prefix_is_a_token_prefix_of_every_sequence(
    tokenizer: Any, sarft_prompts: RolePrompts, rolebench_rows: list[Sample]
) -> None:
    encoder = ChatEncoder(tokenizer, sarft_prompts)
    keys = {encoder.prefixes[c].key for c in ALL_CONDITIONS}
    assert len(keys) == 3  # one cache entry per condition
    for c in ALL_CONDITIONS:
        prefix = encoder.prefixes[c]
        assert prefix.key.startswith(c.value + ":")
        assert len(prefix.token_ids) > 0
        for sample in rolebench_rows:
            seq = encoder.encode(sample, c)
            assert seq.prefix == prefix
            n = seq.shared_len
            assert 0 < n < seq.response_spans[0][0]
            assert tuple(seq.token_ids[:n]) == prefix.token_ids[:n]
            if encoder.supports_system:
                # The prefix ends with the template's "user\n": a clean token boundary.
                assert n == len(prefix.token_ids), (sample.index, c)
                assert tuple(seq.token_ids[:n]) == prefix.token_ids
            else:
                # The system text is joined to the question by a space, which BPE merges into
                # the question's first word, so the last prefix token may not be shared.
                assert n >= len(prefix.token_ids) - 1, (sample.index, c)


def test_prefix_for_system_template_holds_the_system_text(
    bundled_tokenizer: Any, sarft_prompts: RolePrompts
) -> None:
    encoder = ChatEncoder(bundled_tokenizer, sarft_prompts)
    role_text = bundled_tokenizer.decode(list(encoder.prefixes[Condition.ROLE].token_ids))
    assert role_text == (
        f"<|im_start|>system\n{sarft_prompts.role_prompt}<|im_end|>\n<|im_start|>user\n"
    )
    ref_text = bundled_tokenizer.decode(list(encoder.prefixes[Condition.REF].token_ids))
    assert ref_text == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n"


def test_reference_condition_renders_an_explicit_empty_system_message(
    bundled_tokenizer: Any, sarft_prompts: RolePrompts, rolebench_rows: list[Sample]
) -> None:
    sample = rolebench_rows[0]
    question, answer = question_answer(sample)
    encoder = ChatEncoder(bundled_tokenizer, sarft_prompts)
    seq = encoder.encode(sample, Condition.REF)
    text = bundled_tokenizer.decode(seq.token_ids)
    assert text == (
        "<|im_start|>system\n<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n"
        f"<|im_start|>assistant\n{answer}<|im_end|>"
    )
    assert "SmolLM" not in text
    # Without the explicit empty system message SmolLM2's template injects its own.
    default = bundled_tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert "SmolLM" in default


def test_system_less_template_prepends_the_system_text(
    tiny_tokenizer: Any, sarft_prompts: RolePrompts, rolebench_rows: list[Sample]
) -> None:
    sample = rolebench_rows[0]
    question, answer = question_answer(sample)
    encoder = ChatEncoder(tiny_tokenizer, sarft_prompts)
    for c in ALL_CONDITIONS:
        seq = encoder.encode(sample, c)
        start = seq.response_spans[0][0]
        prompt = tiny_tokenizer.decode(seq.token_ids[:start])
        system = sarft_prompts.system_text(c)
        assert prompt == f"<|im_start|>user\n{system} {question}<|im_end|>\n<|im_start|>assistant\n"
        assert tiny_tokenizer.decode(seq.token_ids[start:]) == answer + tiny_tokenizer.eos_token


def test_shared_len_is_capped_below_the_first_response_token(
    tokenizer: Any, sarft_prompts: RolePrompts, rolebench_rows: list[Sample]
) -> None:
    """With a prompt limit shorter than the prefix, the prompt is entirely prefix tokens."""
    encoder = ChatEncoder(tokenizer, sarft_prompts, EncodingConfig(max_prompt_tokens=20))
    for c in (Condition.ROLE, Condition.UNSAFE):
        prefix = encoder.prefixes[c]
        assert len(prefix.token_ids) == 20
        for sample in rolebench_rows[:4]:
            question, answer = question_answer(sample)
            seq = encoder.encode(sample, c)
            full_prompt = reference_prompt_ids(
                tokenizer,
                sarft_prompts.system_text(c),
                question,
                supports_system=encoder.supports_system,
            )
            assert seq.truncated
            assert seq.token_ids[:20] == full_prompt[:20] == list(prefix.token_ids)
            assert seq.response_spans == ((20, 20 + len(reference_label_ids(tokenizer, answer))),)
            # Position 19 predicts the first response token, so it must be computed.
            assert seq.shared_len == 19


def test_response_limit(tokenizer: Any, sarft_prompts: RolePrompts) -> None:
    answer = "Arr, " * 200
    sample = Sample(
        0, 1, (Message("user", "Who are you?", scored=False), Message("assistant", answer)), {}
    )
    encoder = ChatEncoder(tokenizer, sarft_prompts, EncodingConfig(max_response_tokens=16))
    seq = encoder.encode(sample, Condition.ROLE)
    assert seq.truncated
    assert seq.num_response_tokens == 16
    start, end = seq.response_spans[0]
    assert end == len(seq.token_ids)
    assert seq.token_ids[start:end] == tokenize(tokenizer, answer + tokenizer.eos_token)[:16]


def test_multi_turn_spans_and_context_only_turns(
    bundled_tokenizer: Any, sarft_prompts: RolePrompts
) -> None:
    tok = bundled_tokenizer
    eos = tok.eos_token
    messages = (
        Message("system", "ignored: the condition sets the system message", scored=False),
        Message("user", "Where is the rum?", scored=False),
        Message("assistant", "Gone, mate.", scored=False),  # "weight": 0
        Message("user", "Why?", scored=False),
        Message("assistant", "Somebody drank it."),
    )
    encoder = ChatEncoder(tok, sarft_prompts)
    both = Sample(
        0, 1, tuple(Message(m.role, m.content, m.role == "assistant") for m in messages), {}
    )
    one = Sample(1, 2, messages, {})
    for c in ALL_CONDITIONS:
        system = sarft_prompts.system_text(c)
        text = tok.decode(encoder.encode(both, c).token_ids)
        assert text == (
            f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\nWhere is the rum?<|im_end|>\n"
            f"<|im_start|>assistant\nGone, mate.{eos}\n"
            f"<|im_start|>user\nWhy?<|im_end|>\n"
            f"<|im_start|>assistant\nSomebody drank it.{eos}"
        )
        seq = encoder.encode(both, c)
        assert [tok.decode(seq.token_ids[s:e]) for s, e in seq.response_spans] == [
            "Gone, mate." + eos,
            "Somebody drank it." + eos,
        ]
        context_only = encoder.encode(one, c)
        assert context_only.token_ids == seq.token_ids
        assert context_only.response_spans == seq.response_spans[1:]


def test_sample_without_scored_turn_is_rejected(
    bundled_tokenizer: Any, sarft_prompts: RolePrompts
) -> None:
    encoder = ChatEncoder(bundled_tokenizer, sarft_prompts)
    sample = Sample(
        0, 7, (Message("user", "Hi", scored=False), Message("assistant", "Ahoy", scored=False)), {}
    )
    with pytest.raises(EncodingError, match="line 7"):
        encoder.encode(sample, Condition.ROLE)


def test_context_only_turn_does_not_change_later_prompt_truncation(
    bundled_tokenizer: Any, sarft_prompts: RolePrompts
) -> None:
    """A "weight": 0 answer changes which tokens count, never the tokens themselves.

    Both turns' prompts exceed max_prompt_tokens. Whatever the rule for cutting later turns'
    prompts, it must be the same whether the first answer is scored or context only.
    """
    long_question = "Tell me about the Black Pearl. " * 20
    turns = [
        ("user", long_question),
        ("assistant", "She's the fastest ship in the Caribbean."),
        ("user", long_question + "And the Flying Dutchman?"),
        ("assistant", "Not a ship you want to meet, mate."),
    ]
    scored = Sample(0, 1, tuple(Message(r, c, r == "assistant") for r, c in turns), {})
    first_is_context = Sample(
        1,
        2,
        tuple(Message(r, c, r == "assistant" and i == 3) for i, (r, c) in enumerate(turns)),
        {},
    )
    encoder = ChatEncoder(bundled_tokenizer, sarft_prompts, EncodingConfig(max_prompt_tokens=40))
    for c in ALL_CONDITIONS:
        a = encoder.encode(scored, c)
        b = encoder.encode(first_is_context, c)
        assert a.truncated and b.truncated
        assert len(a.response_spans) == 2 and len(b.response_spans) == 1
        assert b.token_ids == a.token_ids, (
            f"{c.value}: {len(a.token_ids)} tokens when the first answer is scored, "
            f"{len(b.token_ids)} when it is context only"
        )
        assert b.response_spans == a.response_spans[1:]
