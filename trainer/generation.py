"""Greedy, batched generation for the evaluation: the prompts rendered and tokenized the way
:mod:`worker.encoding` renders them for scoring and training, left-padded batches of similar
length, and the answer's new tokens only.

The engine is a transformers model, or any :class:`TokenGenerator` (vLLM's:
:mod:`trainer.vllm_generation`). On CPU a float32 model answers through a bfloat16 copy of itself
by default (:func:`generation_model`): AMX/AVX-512 bf16 matmuls run about twice float32's speed,
and the judged answers agree (README, "Evaluation").
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch

from trainer.config import EVAL_DTYPES
from worker.encoding import template_supports_system
from worker.prompts import Condition, RolePrompts

Progress = Callable[[int, int], None]
"""Called after each generated batch with (prompts done, prompts in total)."""


@runtime_checkable
class TokenGenerator(Protocol):
    """An engine that stands in for the model everywhere in this module (vLLM's:
    :mod:`trainer.vllm_generation`): it gets the prompts tokenized here, so both paths see the
    same input, and returns each greedy answer's new token ids as :func:`generate_ids` does."""

    def generate_ids(
        self,
        encoded: Sequence[list[int]],
        max_new_tokens: int,
        batch_size: int,
        progress: Progress | None,
    ) -> list[list[int]]: ...


# --- generation ----------------------------------------------------------------------------------


def render_question(
    tokenizer: Any, system: str | None, question: str, supports_system: bool
) -> str:
    """The chat prompt for one question, ending with the assistant's generation prompt.

    ``system`` None sends the question alone, so the template's own default (if any) applies.
    """
    if system is None:
        messages = [{"role": "user", "content": question}]
    elif supports_system:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    else:
        messages = [{"role": "user", "content": system + " " + question}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _greedy_config(model: Any, max_new_tokens: int, pad_id: int, eos_id: int) -> Any:
    """The model's generation config with sampling switched off (and no warnings about it)."""
    from transformers import GenerationConfig

    config = GenerationConfig.from_dict(model.generation_config.to_dict())
    config.do_sample, config.num_beams = False, 1
    config.temperature = config.top_p = config.top_k = None
    config.max_new_tokens, config.max_length = max_new_tokens, None
    config.pad_token_id = pad_id
    if config.eos_token_id is None:
        config.eos_token_id = eos_id
    return config


def system_text(role: str | None, extra: str | None) -> str | None:
    """The role's system prompt, then a prompt set's own (a jailbreak's), a blank line apart."""
    parts = [part for part in (role, extra) if part]
    return "\n\n".join(parts) if parts else None


def _encode(tokenizer: Any, system: str | None, questions: Sequence[str]) -> list[list[int]]:
    """Rendered prompts tokenized like the encoder does (the template supplies the specials)."""
    supports_system = template_supports_system(tokenizer)
    texts = [render_question(tokenizer, system, q, supports_system) for q in questions]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def _left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def _until_eos(ids: list[int], eos: int | list[int] | None) -> list[int]:
    stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    end = next((n + 1 for n, token in enumerate(ids) if token in stops), len(ids))
    return ids[:end]


@torch.inference_mode()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: RolePrompts | None,
    questions: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    *,
    condition: Condition = Condition.ROLE,
    progress: Progress | None = None,
    system: str | None = None,
) -> list[list[int]]:
    """The new token ids of each question's greedy answer, without padding (EOS kept).

    ``model`` is a transformers model or a :class:`TokenGenerator`. ``system`` is sent after
    the role's system prompt (alone when ``prompts`` is None).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be at least 1")
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    role = None if prompts is None else prompts.system_text(condition)
    encoded = _encode(tokenizer, system_text(role, system), questions)
    if isinstance(model, TokenGenerator):
        return model.generate_ids(encoded, max_new_tokens, batch_size, progress)
    config = _greedy_config(model, max_new_tokens, pad_id, eos_id)
    device = next(model.parameters()).device
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    out: list[list[int]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()  # no dropout, even when called in the middle of training
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    contiguous = None if head is None else head.register_forward_pre_hook(_contiguous_inputs)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = _left_pad([encoded[i] for i in chunk], pad_id)
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
            for row, i in enumerate(chunk):
                out[i] = _until_eos(generated[row, ids.shape[1] :].tolist(), config.eos_token_id)
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
        if contiguous is not None:
            contiguous.remove()
    return out


def _contiguous_inputs(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The LM head's input, made contiguous. At the prefill it is the last position sliced out
    of the batch's hidden states; on CPU, torch multiplied that strided [batch, 1, hidden] view
    through a batched path that expanded the bfloat16 head for every row: Qwen's 152k x 896
    head x 64 prompts took 17 GB more and 30 s instead of 0.04 s."""
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: RolePrompts | None,
    questions: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    *,
    condition: Condition = Condition.ROLE,
    progress: Progress | None = None,
    system: str | None = None,
) -> list[str]:
    """Greedy answers to ``questions`` under the role's ``condition`` system prompt.

    Returns only the new text, special tokens skipped and surrounding whitespace stripped.
    """
    ids = generate_ids(
        model, tokenizer, prompts, questions, max_new_tokens, batch_size, condition=condition,
        progress=progress, system=system,
    )  # fmt: skip
    return [str(tokenizer.decode(x, skip_special_tokens=True)).strip() for x in ids]


# --- precision -----------------------------------------------------------------------------------


def resolved_dtype(model: Any, dtype: str) -> torch.dtype | None:
    """The dtype ``model`` answers in, or None for "as it is" (an engine, or no change).

    "auto" is bfloat16 for a float32 model on CPU (twice the matmul speed there), else the
    model's own dtype: on a GPU nothing was measured that would justify a change."""
    if dtype not in EVAL_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(EVAL_DTYPES)}; got {dtype!r}")
    if isinstance(model, TokenGenerator):
        return None
    parameter = next(model.parameters())
    if dtype == "auto":
        cpu_float32 = parameter.device.type == "cpu" and parameter.dtype == torch.float32
        return torch.bfloat16 if cpu_float32 else None
    wanted = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    return None if parameter.dtype == wanted else wanted


@contextmanager
def generation_model(model: Any, dtype: str = "auto") -> Iterator[Any]:
    """``model``, or a copy of it in the dtype to answer in (a LoRA model's merged), freed on
    exit.

    A copy, not a cast in place: the model may go on training, and float32 weights cast to
    bfloat16 and back lose their low bits. The copy costs its weights' memory (half the
    float32 model's) for the evaluation's length."""
    target = resolved_dtype(model, dtype)
    if target is None:
        yield model
        return
    was_training = model.training
    clone = copy.deepcopy(model).to(target)
    # A LoRA model answers as its merged copy: a plain model, whose forward takes
    # logits_to_keep, so generate() projects only the last prompt position onto the vocabulary
    # (PEFT's wrapper does not take it: every position of 64 prompts x 500 tokens onto Qwen's
    # 152k vocabulary), and no adapter runs beside each layer.
    merge = getattr(clone, "merge_and_unload", None)
    if callable(merge):
        clone = merge()
    clone.eval()
    try:
        yield clone
    finally:
        del clone
        model.train(was_training)
