"""Scorer on vLLM's offline engine (GPU), installed with the ``gpu`` extra.

vLLM returns the log-probability of every actual prompt token when asked for
``prompt_logprobs=0``; one extra generated token is the cheapest request it
accepts. Prompt-logprob requests bypass vLLM's prefix cache and materialise
[tokens x vocab] logits, so ``max_num_batched_tokens`` bounds that memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from worker.encoding import EncodedSequence
from worker.scoring.base import ResponseLogprob


class VllmUnavailableError(RuntimeError):
    pass


def vllm_available() -> tuple[bool, str]:
    """Whether this process can run the vLLM backend, and if not, why."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False, "vLLM is not installed (pip install '.[gpu]')"
    import torch

    if not torch.cuda.is_available():
        return False, "vLLM needs a CUDA GPU and none is visible"
    return True, ""


class VllmScorer:
    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "bfloat16",
        max_num_batched_tokens: int = 16384,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        seed: int = 0,
        llm: Any = None,
    ) -> None:
        ok, why = vllm_available()
        if llm is None and not ok:
            raise VllmUnavailableError(why)
        from vllm import LLM, SamplingParams

        self.llm = llm or LLM(
            model=model_path,
            dtype=dtype,
            max_num_batched_tokens=max_num_batched_tokens,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            # Prompt-logprob requests skip the prefix cache anyway.
            enable_prefix_caching=False,
            seed=seed,
        )
        params: dict[str, Any] = {
            "prompt_logprobs": 0,
            "max_tokens": 1,
            "detokenize": False,
            "temperature": 0.0,
        }
        try:  # flat_logprobs (newer vLLM) avoids one dict per position
            self.params = SamplingParams(**params, flat_logprobs=True)
        except TypeError:
            self.params = SamplingParams(**params)

    def score(
        self,
        sequences: Sequence[EncodedSequence],
        on_scored: Callable[[int], None] | None = None,
    ) -> list[ResponseLogprob]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(s.token_ids)) for s in sequences]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        results = []
        for seq, out in zip(sequences, outputs, strict=True):
            logprobs = out.prompt_logprobs  # position 0 is None: nothing predicts it
            total = 0.0
            for start, end in seq.response_spans:
                for pos in range(start, end):
                    total += float(logprobs[pos][seq.token_ids[pos]].logprob)
            results.append(ResponseLogprob(sum=total, count=seq.num_response_tokens))
        if on_scored is not None:
            on_scored(len(sequences))
        return results
