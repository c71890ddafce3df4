"""Evaluation answers from vLLM's offline engine (``EvalConfig.backend = "vllm"``).

The metrics, the judge and the report stay :mod:`trainer.evaluate`'s: a :class:`VllmGenerator`
stands in for the model there, gets the prompts tokenized as the transformers path tokenizes
them (``TokensPrompt``), and answers greedily under the model's own generation config: its EOS
ids end an answer (and nothing else does: vLLM's tokenizer EOS is switched off in their
favour, as ``generate`` knows only the config's), its repetition penalty applies.

The base and the tuned model are evaluated after training, in one engine for a LoRA run (the
base with no adapter, the tuned model with the saved PEFT adapter as a ``LoRARequest``), one
after the other for a full fine-tune. vLLM is imported inside the functions: it is optional.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig
from trainer.evaluate import Progress, TokenGenerator
from worker.vllm_engine import (
    VllmEngineOptions,
    VllmUnavailableError,
    build_llm,
    shutdown_llm,
    vllm_available,
)

DTYPE = "bfloat16"  # vLLM's fast path on a GPU and on this kind of CPU alike
MIN_CALL = 32
"""Fewest prompts per ``LLM.generate`` call: vLLM batches within a call, so a call as small as
a transformers batch would leave it idle; progress and cancel checks come after each call."""
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's LoRAConfig accepts
TUNED_ADAPTER = "tuned"


def require_vllm(
    config: TrainConfig | None = None, options: VllmEngineOptions | None = None
) -> None:
    """Raise ``VllmUnavailableError`` (saying what is missing) unless this process can evaluate
    in vLLM, and ``ValueError`` when the run's LoRA rank is above the engine's
    ``max_lora_rank``: called before training, so a run does not fail once its training is
    done."""
    ok, why = vllm_available()
    if not ok:
        raise VllmUnavailableError(
            f"evaluation.backend 'vllm' needs vLLM where the run trains: {why}"
        )
    cap = (options or VllmEngineOptions()).max_lora_rank
    if config is not None and config.lora is not None and config.lora.r > cap:
        raise ValueError(_too_large(config.lora.r, cap))


def _too_large(rank: int, cap: int) -> str:
    return (
        f"the LoRA rank {rank} is above the vLLM engine's max_lora_rank ({cap}): evaluate "
        "with backend 'transformers', or raise the engine's limit"
    )


@dataclass(frozen=True)
class GreedySettings:
    """What greedy decoding takes from a model's generation config."""

    stop_ids: tuple[int, ...]
    repetition_penalty: float = 1.0


def greedy_settings(model_path: str, tokenizer: Any) -> GreedySettings:
    """The generation config transformers gives the model at ``model_path`` (its
    generation_config.json, else one derived from config.json), read as the transformers
    path's ``_greedy_config`` reads it: its EOS ids, or the tokenizer's EOS."""
    from transformers import AutoConfig, GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model_path)
    except OSError:
        config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_path))
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{model_path} has no EOS token: an answer would never end")
    stops = tuple(eos) if isinstance(eos, list) else (int(eos),)
    return GreedySettings(stops, float(config.repetition_penalty or 1.0))


@dataclass(frozen=True)
class VllmGenerator:
    """A :class:`trainer.evaluate.TokenGenerator` over a ``vllm.LLM``; ``lora`` (a
    ``LoRARequest``) answers as the adapted model, None as the base."""

    llm: Any
    greedy: GreedySettings
    lora: Any | None = None

    def generate_ids(
        self,
        encoded: Sequence[list[int]],
        max_new_tokens: int,
        batch_size: int,
        progress: Progress | None,
    ) -> list[list[int]]:
        """Each prompt's greedy answer as new token ids, the stopping EOS kept (as
        :func:`trainer.evaluate.generate_ids` returns them)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            ignore_eos=True,
            stop_token_ids=list(self.greedy.stop_ids),
            repetition_penalty=self.greedy.repetition_penalty,
            detokenize=False,  # decoded by the caller, with the transformers path's tokenizer
        )
        step = max(batch_size, MIN_CALL)
        out: list[list[int]] = []
        for start in range(0, len(encoded), step):
            chunk = [TokensPrompt(prompt_token_ids=list(ids)) for ids in encoded[start:][:step]]
            results = self.llm.generate(chunk, params, use_tqdm=False, lora_request=self.lora)
            out.extend(_answer_ids(result, self.greedy.stop_ids) for result in results)
            if progress is not None:
                progress(len(out), len(encoded))
        return out


def _answer_ids(result: Any, stops: Sequence[int]) -> list[int]:
    ids = list(result.outputs[0].token_ids)
    end = next((n + 1 for n, token in enumerate(ids) if token in stops), len(ids))
    return ids[:end]


def adapter_rank(adapter_dir: Path) -> int:
    """The largest rank of the PEFT LoRA adapter saved in ``adapter_dir``."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def lora_options(adapter_dir: Path, options: VllmEngineOptions) -> VllmEngineOptions:
    """``options`` for an engine that serves the adapter in ``adapter_dir`` alone: its
    ``max_lora_rank`` lowered to the smallest rank vLLM accepts that holds the adapter.

    The engine sizes its LoRA buffers by that rank, and its CPU kernels gather a [rank x
    hidden] matrix per token: measured, an r=8 adapter answered 14x slower than the base
    under the default 64. Raises ``ValueError`` for an adapter above ``options``' limit.
    """
    rank = adapter_rank(adapter_dir)
    if rank > options.max_lora_rank:
        raise ValueError(_too_large(rank, options.max_lora_rank))
    fit = next((r for r in LORA_RANKS if r >= rank), options.max_lora_rank)
    return dataclasses.replace(options, max_lora_rank=min(fit, options.max_lora_rank))


def adapter_request(adapter_dir: Path) -> Any:
    """The ``LoRARequest`` that serves the PEFT adapter saved in ``adapter_dir``."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(TUNED_ADAPTER, 1, str(adapter_dir))


@contextmanager
def engine(
    model_path: str, options: VllmEngineOptions, *, enable_lora: bool = False
) -> Iterator[Any]:
    """A ``vllm.LLM`` on ``model_path``, shut down on leaving, whatever ended the block."""
    # The engine's process must not be forked from one that has run torch (training did).
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    llm = build_llm(model_path, dtype=DTYPE, options=options, enable_lora=enable_lora)
    try:
        yield llm
    finally:
        shutdown_llm(llm)  # its process and KV cache now, not at interpreter exit


def evaluate_base_and_tuned(
    run: Callable[[str, TokenGenerator], None],
    base_path: str,
    tokenizer: Any,
    *,
    adapter_dir: Path | None = None,
    model_dir: Path | None = None,
    with_base: bool = True,
    options: VllmEngineOptions | None = None,
) -> None:
    """Call ``run("base", generator)`` (unless not ``with_base``), then ``run("tuned",
    generator)``, each generator answering as that model.

    A LoRA run (``adapter_dir``) serves both from one engine on ``base_path``; a full fine-tune
    (``model_dir``, as ``save_pretrained`` wrote it with its tokenizer) gets an engine on each,
    the base's shut down before the tuned one starts.
    """
    greedy = greedy_settings(base_path, tokenizer)
    options = options or VllmEngineOptions()
    if adapter_dir is not None:
        with engine(base_path, lora_options(adapter_dir, options), enable_lora=True) as llm:
            if with_base:
                run("base", VllmGenerator(llm, greedy))
            run("tuned", VllmGenerator(llm, greedy, adapter_request(adapter_dir)))
        return
    if model_dir is None:
        raise ValueError("no adapter and no model directory: nothing tuned to evaluate")
    if with_base:
        with engine(base_path, options) as llm:
            run("base", VllmGenerator(llm, greedy))
    with engine(str(model_dir), options) as llm:
        run("tuned", VllmGenerator(llm, greedy))
