"""The vLLM rows of bench/scoring.py (``--backend vllm``, in the environment of
``make install-vllm``): vLLM as the backend ran before prefix reuse (every sample's system
prompt recomputed) and vLLM reading the shared system prompt from its prefix cache, in one
engine; bench/scoring.py adds the float32 check of the samples near the margin to the latter.

vLLM computes full-vocabulary logits at every prompt position it runs, so its FLOPs are
the naive method's less the positions read from the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from worker.encoding import EncodedSequence
from worker.scoring.base import ResponseLogprob
from worker.vllm_engine import VllmEngineOptions, build_llm, shutdown_llm


@dataclass
class VllmRun:
    name: str
    means: list[float]
    seconds: float
    cached_tokens: int
    rescored: int


def _means(results: list[ResponseLogprob]) -> list[float]:
    return [r.mean for r in results]


def run_vllm(
    model_path: str,
    sequences: list[EncodedSequence],
    dtype: str = "bfloat16",
    options: VllmEngineOptions | None = None,
) -> tuple[list[VllmRun], float]:
    """The two vLLM runs (timed after a warm-up) and the engine's start-up seconds."""
    from worker.scoring.vllm_backend import VllmScorer

    start = time.perf_counter()
    llm = build_llm(model_path, dtype=dtype, options=options)
    startup_s = time.perf_counter() - start
    try:
        VllmScorer("", llm=llm, reuse_prefix=False).score(sequences[:3])  # first-call costs
        runs = []
        modes = (("vllm bf16, no prefix reuse", False), ("vllm bf16, prefix reuse", True))
        for name, reuse in modes:
            llm.reset_prefix_cache()
            scorer = VllmScorer("", llm=llm, reuse_prefix=reuse)
            start = time.perf_counter()
            means = _means(scorer.score(sequences))
            seconds = time.perf_counter() - start
            runs.append(VllmRun(name, means, seconds, scorer.cached_tokens, scorer.rescored))
    finally:
        shutdown_llm(llm)
    return runs, startup_s


def vllm_flops(naive: float, cached_tokens: int, params: int, vocab: int, hidden: int) -> float:
    """The naive FLOPs less the positions the prefix cache spared."""
    return naive - cached_tokens * (2 * params + 2 * vocab * hidden)
