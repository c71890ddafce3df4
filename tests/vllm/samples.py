"""Samples and comparisons shared by the vLLM scoring tests."""

from __future__ import annotations

from worker.formats import Message, Sample
from worker.scoring.base import ResponseLogprob


def multi_turn_and_truncated(rows: list[Sample]) -> list[Sample]:
    """The first rows as they are, then a two-turn sample (both answers scored) and one whose
    answer exceeds 128 tokens, made of the last two rows' questions so that no sample starts
    like another beyond the system prompt (which would let vLLM read a response from the
    cache; test_a_response_read_from_the_cache_is_scored_again covers that)."""
    plain, (first, second) = list(rows[:-2]), rows[-2:]
    two_turns = Sample(
        index=len(plain),
        line=len(plain) + 1,
        messages=(*first.messages, *second.messages),
        raw={},
    )
    long_answer = " ".join(r.messages[1].content for r in rows[:6])
    truncated = Sample(
        index=len(plain) + 1,
        line=len(plain) + 2,
        messages=(second.messages[0], Message("assistant", long_answer)),
        raw={},
    )
    return [*plain, two_turns, truncated]


def max_mean_difference(got: list[ResponseLogprob], want: list[ResponseLogprob]) -> float:
    assert [g.count for g in got] == [w.count for w in want]
    return max(abs(g.mean - w.mean) for g, w in zip(got, want, strict=True))
