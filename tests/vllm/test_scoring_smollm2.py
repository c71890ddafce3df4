"""The vLLM scorer on the bundled SmolLM2-135M (bfloat16, one engine for the module) against the
project's float32 transformers engine, on 12 samples from RoleBench rows, a multi-turn and a
truncated one among them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vllm.conftest import TEST_ENGINE
from tests.vllm.samples import max_mean_difference, multi_turn_and_truncated
from worker.encoding import ChatEncoder, EncodedSequence
from worker.formats import Sample
from worker.model_loader import LoadedModel
from worker.prompts import Condition, RolePrompts
from worker.scoring.backends import CHECK_BANDS
from worker.scoring.base import ResponseLogprob
from worker.scoring.engine import score_samples
from worker.scoring.transformers_backend import TransformersScorer
from worker.scoring.vllm_backend import VllmScorer
from worker.vllm_engine import build_llm, shutdown_llm

CONDITIONS = (Condition.ROLE, Condition.UNSAFE, Condition.REF)
# Measured on these 12 samples (36 sequences): the largest |mean log-prob difference| to the
# float32 engine was 0.013, and 0.015 between vLLM with and without prefix reuse (bf16 rounds
# differently in a different batch). Bounds at about 3x.
BF16_BOUND = 0.05
CHECK_BAND = CHECK_BANDS["vllm"]


@pytest.fixture(scope="module")
def engine(bundled_model_dir: Path) -> Iterator[Any]:
    llm = build_llm(str(bundled_model_dir), dtype="bfloat16", options=TEST_ENGINE)
    yield llm
    shutdown_llm(llm)


@pytest.fixture(scope="module")
def samples(rolebench_rows: list[Sample]) -> list[Sample]:
    return multi_turn_and_truncated(rolebench_rows)


@pytest.fixture(scope="module")
def encoded(
    bundled_model: LoadedModel, sarft_prompts: RolePrompts, samples: list[Sample]
) -> list[EncodedSequence]:
    encoder = ChatEncoder(bundled_model.tokenizer, sarft_prompts)
    sequences = [encoder.encode(s, c) for s in samples for c in CONDITIONS]
    assert any(s.truncated for s in sequences)
    assert any(len(s.response_spans) == 2 for s in sequences)
    return sequences


@pytest.fixture(scope="module")
def float32_scores(
    bundled_model: LoadedModel, encoded: list[EncodedSequence]
) -> list[ResponseLogprob]:
    return TransformersScorer(bundled_model.model).score(encoded)


def test_vllm_matches_the_float32_engine_with_and_without_prefix_reuse(
    engine: Any, encoded: list[EncodedSequence], float32_scores: list[ResponseLogprob]
) -> None:
    reused = VllmScorer("", llm=engine, reuse_prefix=True)
    with_reuse = reused.score(encoded)
    # The system prompts were read from the cache, and no response position was.
    assert reused.cached_tokens > 0
    assert reused.rescored == 0
    without_reuse = VllmScorer("", llm=engine, reuse_prefix=False).score(encoded)
    assert max_mean_difference(with_reuse, float32_scores) < BF16_BOUND
    assert max_mean_difference(without_reuse, float32_scores) < BF16_BOUND
    assert max_mean_difference(with_reuse, without_reuse) < BF16_BOUND


def test_a_response_read_from_the_cache_is_scored_again(
    engine: Any, encoded: list[EncodedSequence], float32_scores: list[ResponseLogprob]
) -> None:
    """The same sequences twice in one call, one generate call apart: the second time their
    whole blocks, responses included, are cached. vLLM would return garbage for those
    positions, so each such sequence is scored again without reading the cache."""
    scorer = VllmScorer("", llm=engine, batch_sequences=len(encoded))
    twice = scorer.score([*encoded, *encoded])
    assert scorer.rescored > len(encoded) // 2
    first, again = twice[: len(encoded)], twice[len(encoded) :]
    assert max_mean_difference(again, float32_scores) < BF16_BOUND
    assert max_mean_difference(first, float32_scores) < BF16_BOUND
    # A later call starts from an empty cache: nothing of the earlier one is read.
    scorer.rescored = 0
    assert max_mean_difference(scorer.score(encoded), first) < BF16_BOUND
    assert scorer.rescored == 0


def test_flags_equal_float32_with_the_float32_check_near_the_margin(
    engine: Any,
    bundled_model: LoadedModel,
    sarft_prompts: RolePrompts,
    samples: list[Sample],
    float32_scores: list[ResponseLogprob],
) -> None:
    encoder = ChatEncoder(bundled_model.tokenizer, sarft_prompts)
    checker = TransformersScorer(bundled_model.model)
    scored = list(
        score_samples(
            samples,
            encoder,
            VllmScorer("", llm=engine),
            checker=checker,
            check_band=CHECK_BAND,
        )
    )
    exact = [
        float32_scores[3 * i + 1].mean - float32_scores[3 * i].mean for i in range(len(samples))
    ]
    assert [s.flagged for _, s in scored] == [d > 0 for d in exact]
    # The rows near the margin carry float32's role and unsafe scores (bf16's error on the
    # difference, 0.013 here, is below two thirds of the band, so every such row was checked).
    near = [(s, d) for (_, s), d in zip(scored, exact, strict=True) if abs(d) < CHECK_BAND / 3]
    assert near
    for s, d in near:
        assert s.unsafe.mean - s.role.mean == pytest.approx(d, abs=1e-5)


def test_shutdown_stops_the_output_thread_before_returning(engine: Any) -> None:
    # Last in the module: it shuts the shared engine down (the fixture's second shutdown is a
    # no-op). A thread left running would free its last outputs while the interpreter exits,
    # which aborted one `sarft score --backend vllm` run in three.
    thread = engine.llm_engine.engine_core.output_queue_thread
    assert thread.is_alive()
    shutdown_llm(engine)
    assert not thread.is_alive()
