"""Training examples: samples encoded for training, with their KL flag.

By default a sample is encoded as the SaRFT collator does it (``sys_prompt=""``): the chat
template with an explicit empty system message, prompt cut to its first 512 tokens, every
assistant turn labelled with ``answer + EOS`` cut to its first 128 tokens, and ``-100``
everywhere else (see :mod:`worker.encoding`). The role prompt feeds only the flags.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainer.config import Method, TrainSystemPrompt
from trainer.loss import IGNORE_INDEX
from worker.encoding import ChatEncoder, EncodingConfig
from worker.formats import Sample
from worker.prompts import Condition, RolePrompts


@dataclass(frozen=True, slots=True)
class TrainExample:
    input_ids: list[int]
    labels: list[int]
    """Aligned with ``input_ids``: the token at response positions, ``-100`` elsewhere."""
    kl_flag: int
    """1 when the KL anchor applies to this sample."""

    @property
    def num_response_tokens(self) -> int:
        """Label tokens the model can predict (a label at position 0 has no context)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: torch.Tensor
    """[B, T] right-padded token ids."""
    labels: torch.Tensor
    """[B, T] response token ids, ``-100`` on prompt and padding."""
    attention_mask: torch.Tensor
    """[B, T] 1 on real tokens, 0 on padding."""
    kl_flags: torch.Tensor
    """[B] float 0/1: rows the KL term applies to."""

    def rows(self, index: torch.Tensor) -> Batch:
        """The rows ``index`` (same width, so positions line up with the whole batch's)."""
        return Batch(
            self.input_ids[index],
            self.labels[index],
            self.attention_mask[index],
            self.kl_flags[index],
        )

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.attention_mask.to(device),
            self.kl_flags.to(device),
        )


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its EOS id when it has none (padding is masked anyway)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return int(pad)


# The empty system message is the scorer's reference condition: the same encoding.
TRAINING_CONDITIONS: dict[str, Condition | None] = {
    "empty": Condition.REF,
    "role": Condition.ROLE,
    "none": None,
}


def encode_examples(
    samples: Sequence[Sample],
    kl_flags: Sequence[int],
    tokenizer: Any,
    prompts: RolePrompts,
    *,
    max_prompt_tokens: int = 512,
    max_response_tokens: int = 128,
    system_prompt: TrainSystemPrompt = "empty",
) -> list[TrainExample]:
    """Encode every sample with ``system_prompt``'s system message (see
    :attr:`trainer.config.TrainConfig.train_system_prompt`); ``kl_flags`` is one 0/1 per
    sample."""
    if len(kl_flags) != len(samples):
        raise ValueError(f"{len(kl_flags)} KL flags for {len(samples)} samples")
    encoder = ChatEncoder(
        tokenizer,
        prompts,
        EncodingConfig(
            max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens
        ),
    )
    examples: list[TrainExample] = []
    for sample, flag in zip(samples, kl_flags, strict=True):
        encoded = encoder.encode(sample, TRAINING_CONDITIONS[system_prompt])
        labels = [IGNORE_INDEX] * len(encoded.token_ids)
        for start, end in encoded.response_spans:
            labels[start:end] = encoded.token_ids[start:end]
        examples.append(TrainExample(list(encoded.token_ids), labels, int(bool(flag))))
    return examples


def collate(examples: Sequence[TrainExample], pad_id: int) -> Batch:
    """Right-pad to the longest example; padding gets label -100 and attention 0."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    flags = torch.tensor([e.kl_flag for e in examples], dtype=torch.float32)
    return Batch(input_ids, labels, attention_mask, flags)


def select_kl_subset(flags: Sequence[bool | int], method: Method, seed: int = 0) -> list[int]:
    """The 0/1 KL indicator per sample for a training method.

    "sarft": the RDS flags; "sft": all zeros; "random": as many ones as there are flags, at
    positions drawn uniformly with ``seed`` (the same seed gives the same subset); "flip": the
    flags negated (the unflagged samples are anchored).
    """
    flagged = [int(bool(f)) for f in flags]
    if method == "sarft":
        return flagged
    if method == "sft":
        return [0] * len(flagged)
    if method == "flip":
        return [1 - f for f in flagged]
    if method == "random":
        chosen = set(random.Random(seed).sample(range(len(flagged)), sum(flagged)))
        return [int(i in chosen) for i in range(len(flagged))]
    raise ValueError(f"unknown training method {method!r}")


def plan_steps(num_examples: int, batch_size: int, n_epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of a run: every epoch's batches (the last may be short), capped."""
    total = math.ceil(num_examples / batch_size) * n_epochs
    return total if max_steps is None else min(total, max_steps)


def step_batches(
    examples: Sequence[TrainExample], batch_size: int, total_steps: int, seed: int
) -> Iterator[list[TrainExample]]:
    """The examples of each optimizer step, reshuffled every epoch, for ``total_steps`` steps."""
    shuffle = torch.Generator().manual_seed(seed)
    produced = 0
    while examples and produced < total_steps:
        order = torch.randperm(len(examples), generator=shuffle).tolist()
        for start in range(0, len(examples), batch_size):
            if produced == total_steps:
                return
            produced += 1
            yield [examples[i] for i in order[start : start + batch_size]]
