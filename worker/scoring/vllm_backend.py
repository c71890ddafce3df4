"""Scorer on vLLM's offline engine (CUDA GPU, or x86 CPU with vLLM's CPU build).

vLLM returns the log-probability of every actual prompt token when asked for
``prompt_logprobs=0``; one generated token is the cheapest request it accepts. It materialises
[tokens x vocabulary] logits for every computed prompt position, so
``max_num_batched_tokens`` bounds that memory (``worker.vllm_engine``).

Shared-profile reuse. By default vLLM skips reading its prefix cache for a request that asks
for prompt logprobs, and so recomputes the system prompt of every sample. With
``reuse_prefix`` this scorer lets such requests read the cache
(``skip_reading_prefix_cache=False``): it first runs each condition's prefix once (a cheap
request without logprobs), so the prefix's whole KV blocks are cached before the samples that
start with it are scheduled. Each ``score`` call (a chunk of a job) starts from an empty
cache: only the call's own system prompts are read from it, never blocks another call left
(which would hold whole samples: scoring the same data again would rescore every row).

vLLM does not compute logprobs for positions it read from the cache: those entries (and the
first one after them) come back as garbage, while every later position is exact. A response
token must therefore never fall in a cached block. The guard: vLLM reports
``num_cached_tokens`` per request; a sequence whose first response position is not beyond it
(a duplicate sample, or a long shared first turn, may hit blocks past the system prompt) is
scored again with cache reading off.

vLLM's numbers are not batch-invariant: a sequence's log-probabilities depend on the requests
it is computed beside, and which those are depends on when requests reach the engine's
process. In bfloat16 on a CPU the same chunk scored twice moved mean log-probabilities by up to
about 0.01; the float32 check keeps the flags near the margin, and the transformers backend in
float32 is the one that gives the same numbers on every run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from worker.encoding import EncodedSequence
from worker.scoring.base import ResponseLogprob
from worker.vllm_engine import (
    VllmEngineOptions,
    VllmUnavailableError,
    build_llm,
    shutdown_llm,
    vllm_available,
)

__all__ = ["VllmScorer", "VllmUnavailableError", "vllm_available"]

log = logging.getLogger(__name__)


def _first_response_position(seq: EncodedSequence) -> int:
    return min(start for start, _ in seq.response_spans)


class VllmScorer:
    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "bfloat16",
        reuse_prefix: bool = True,
        options: VllmEngineOptions | None = None,
        batch_sequences: int = 256,
        seed: int = 0,
        llm: Any = None,
    ) -> None:
        """``batch_sequences``: sequences per ``generate`` call, the unit of progress reports;
        vLLM schedules within a call by its own token budget. ``llm``: an engine already
        started (tests share one); it must have prefix caching on for ``reuse_prefix``."""
        if llm is None:
            llm = build_llm(
                model_path,
                dtype=dtype,
                seed=seed,
                options=options,
                enable_prefix_caching=reuse_prefix,
            )
        from vllm import SamplingParams

        self.llm = llm
        self.reuse_prefix = reuse_prefix
        self.batch_sequences = batch_sequences
        base: dict[str, Any] = {
            "prompt_logprobs": 0,
            "max_tokens": 1,
            "detokenize": False,
            "temperature": 0.0,
            "flat_logprobs": True,  # one flat array per request, not one dict per position
        }
        self.params_fresh = SamplingParams(**base)
        self.params_cached = SamplingParams(**base, skip_reading_prefix_cache=False)
        self.params_warm = SamplingParams(max_tokens=1, detokenize=False, temperature=0.0)
        self.rescored = 0
        """Sequences scored again because the cache covered a response position (a count for
        tests and logs)."""
        self.cached_tokens = 0
        """Prompt tokens read from the prefix cache instead of computed, over all calls."""

    def score(
        self,
        sequences: Sequence[EncodedSequence],
        on_scored: Callable[[int], None] | None = None,
    ) -> list[ResponseLogprob]:
        results: list[ResponseLogprob | None] = [None] * len(sequences)
        # Each call starts from an empty cache: what an earlier call (another chunk, an earlier
        # job on the same data) cached cannot be read, so only this call's duplicates can reach
        # a response block. Should vLLM refuse (blocks in use), the guard still holds.
        if self.reuse_prefix and not self.llm.reset_prefix_cache():
            log.warning("vLLM kept its prefix cache: blocks were still in use")
        for begin in range(0, len(sequences), self.batch_sequences):
            batch = list(range(begin, min(begin + self.batch_sequences, len(sequences))))
            scored = self._score_batch([sequences[i] for i in batch])
            for i, result in zip(batch, scored, strict=True):
                results[i] = result
            if on_scored is not None:
                on_scored(len(batch))
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the engine's processes (they would keep the interpreter from exiting)."""
        shutdown_llm(self.llm)

    def _score_batch(self, batch: list[EncodedSequence]) -> list[ResponseLogprob]:
        if not self.reuse_prefix:
            outputs = self._run(batch, False)
            return [_response_logprob(s, out) for s, out in zip(batch, outputs, strict=True)]
        self._warm([s for s in batch if s.shared_len > 0])
        outputs = self._run(batch, True)
        results: list[ResponseLogprob | None] = []
        again: list[int] = []
        for i, (seq, out) in enumerate(zip(batch, outputs, strict=True)):
            cached = out.num_cached_tokens
            if cached is None or cached >= _first_response_position(seq):
                again.append(i)
                results.append(None)
                continue
            self.cached_tokens += cached
            results.append(_response_logprob(seq, out))
        if again:
            self.rescored += len(again)
            log.info("%d sequences read a response position from the cache; rescored", len(again))
            for i, out in zip(again, self._run([batch[i] for i in again], False), strict=True):
                results[i] = _response_logprob(batch[i], out)
        return results  # type: ignore[return-value]

    def _warm(self, sequences: list[EncodedSequence]) -> None:
        """Run each prefix of the batch once, shortest first, so its blocks are cached.

        Every batch warms again: a prefix already cached costs one token, and one evicted
        since (a full KV cache) is cached again."""
        from vllm.inputs import TokensPrompt

        prefixes = {tuple(seq.token_ids[: seq.shared_len]) for seq in sequences}
        # One request at a time: requests scheduled in the same step do not share blocks, and
        # the role prompt is a prefix of the unsafe one.
        for ids in sorted(prefixes, key=len):
            self.llm.generate(
                [TokensPrompt(prompt_token_ids=list(ids))], self.params_warm, use_tqdm=False
            )

    def _run(self, batch: Sequence[EncodedSequence], read_cache: bool) -> list[Any]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(s.token_ids)) for s in batch]
        params = self.params_cached if read_cache else self.params_fresh
        return list(self.llm.generate(prompts, params, use_tqdm=False))


def _response_logprob(seq: EncodedSequence, out: Any) -> ResponseLogprob:
    logprobs = out.prompt_logprobs  # position 0 is None: nothing predicts it
    total = 0.0
    for start, end in seq.response_spans:
        for pos in range(start, end):
            total += float(logprobs[pos][seq.token_ids[pos]].logprob)
    return ResponseLogprob(sum=total, count=seq.num_response_tokens)
