"""The vLLM scorer on the packaged Qwen2.5-Coder-0.5B (qwen2: biased q/k/v, an output projection
apart from the embedding), bfloat16 with prefix reuse, against the project's float32 engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import model_cache_dir
from tests.vllm.conftest import TEST_ENGINE
from tests.vllm.samples import max_mean_difference, multi_turn_and_truncated
from worker.encoding import ChatEncoder
from worker.formats import Sample
from worker.model_loader import LoadedModel, load_model
from worker.prompts import Condition, RolePrompts
from worker.scoring.backends import CHECK_BANDS
from worker.scoring.engine import score_samples
from worker.scoring.transformers_backend import TransformersScorer
from worker.scoring.vllm_backend import VllmScorer
from worker.vllm_engine import build_llm, shutdown_llm

pytestmark = pytest.mark.slow
CONDITIONS = (Condition.ROLE, Condition.UNSAFE, Condition.REF)
# Measured with 24 Jack Sparrow rows: the largest |mean log-prob difference| to the float32
# engine 0.012, between vLLM with and without prefix reuse 0.013, on s_unsafe - s_role 0.018.
BF16_BOUND = 0.05


@pytest.fixture(scope="module")
def engine(qwen_dir: Path) -> Iterator[Any]:
    llm = build_llm(str(qwen_dir), dtype="bfloat16", options=TEST_ENGINE)
    yield llm
    shutdown_llm(llm)


@pytest.fixture(scope="module")
def qwen(qwen_dir: Path) -> LoadedModel:
    return load_model(qwen_dir.name, cache_dir=model_cache_dir(), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def samples(rolebench_rows: list[Sample]) -> list[Sample]:
    return multi_turn_and_truncated(rolebench_rows[:6])


def test_qwen_in_vllm_scores_and_flags_like_the_float32_engine(
    engine: Any, qwen: LoadedModel, sarft_prompts: RolePrompts, samples: list[Sample]
) -> None:
    encoder = ChatEncoder(qwen.tokenizer, sarft_prompts)
    sequences = [encoder.encode(s, c) for s in samples for c in CONDITIONS]
    exact_scorer = TransformersScorer(qwen.model)
    exact = exact_scorer.score(sequences)
    scorer = VllmScorer("", llm=engine)
    got = scorer.score(sequences)
    assert scorer.cached_tokens > 0 and scorer.rescored == 0
    assert max_mean_difference(got, exact) < BF16_BOUND

    scored = list(
        score_samples(
            samples, encoder, scorer, checker=exact_scorer, check_band=CHECK_BANDS["vllm"]
        )
    )
    exact_flags = [exact[3 * i + 1].mean > exact[3 * i].mean for i in range(len(samples))]
    assert [s.flagged for _, s in scored] == exact_flags
