"""The vLLM backend against the transformers backend, on a CUDA GPU with vLLM installed."""

from __future__ import annotations

from typing import Any

import pytest

from worker.encoding import ChatEncoder
from worker.prompts import Condition, RolePrompts
from worker.scoring.vllm_backend import VllmScorer, VllmUnavailableError, vllm_available

AVAILABLE, WHY = vllm_available()


def test_unavailable_backend_says_why() -> None:
    if AVAILABLE:
        pytest.skip("vLLM is available here")
    with pytest.raises(VllmUnavailableError, match="vLLM"):
        VllmScorer("unused")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not AVAILABLE, reason=WHY)
def test_vllm_matches_transformers(
    bundled_model: Any, rolebench_rows: list[Any], sarft_prompts: RolePrompts
) -> None:
    from worker.scoring.transformers_backend import TransformersScorer

    encoder = ChatEncoder(bundled_model.tokenizer, sarft_prompts)
    sequences = [encoder.encode(s, c) for s in rolebench_rows[:8] for c in Condition]
    expected = TransformersScorer(bundled_model.model).score(sequences)
    got = VllmScorer(bundled_model.path, dtype="float32", gpu_memory_utilization=0.3).score(
        sequences
    )
    assert [g.count for g in got] == [e.count for e in expected]
    worst = max(abs(g.mean - e.mean) for g, e in zip(got, expected, strict=True))
    # Different kernels (and the GPU) move fp32 log-probs slightly, never flags.
    assert worst < 1e-2, worst
    flags = [got[i + 1].mean > got[i].mean for i in range(0, len(got), 3)]
    ref_flags = [expected[i + 1].mean > expected[i].mean for i in range(0, len(expected), 3)]
    assert flags == ref_flags
