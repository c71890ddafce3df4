"""Gradient checkpointing: the blocks really run again in the backward, and nothing changes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.trainer.test_checkpoints import assert_same_steps
from tests.trainer.test_train import FLAGS, PROMPTS, SAMPLES, quick_config
from trainer.policy_setup import enable_checkpointing
from trainer.train import TrainResult, fine_tune


def count_block_forwards(model: Any) -> list[int]:
    """Every forward of the first decoder block's MLP with gradients on (the recomputation in
    the backward is one; the cache's and the reference's no-grad forwards are not). The MLP,
    not the block: transformers checkpoints a block's ``forward``, inside its hooks."""
    calls: list[int] = []

    def record(_module: Any, _args: Any) -> None:
        if torch.is_grad_enabled():
            calls.append(1)

    model.get_decoder().layers[0].mlp.register_forward_pre_hook(record)
    return calls


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_checkpointing_recomputes_the_blocks_and_takes_the_same_steps(
    tiny_model: Any, tiny_tokenizer: Any, tmp_path: Path, mode: str
) -> None:
    lora = {} if mode == "lora" else {"lora": None, "learning_rate": 1e-3}
    runs: dict[bool, TrainResult] = {}
    forwards: dict[bool, int] = {}
    for checkpointing in (False, True):
        model = copy.deepcopy(tiny_model)
        calls = count_block_forwards(model)
        config = quick_config(n_epochs=2, gradient_checkpointing=checkpointing, **lora)
        runs[checkpointing] = fine_tune(
            model, tiny_tokenizer, SAMPLES[:8], FLAGS[:8], PROMPTS, config,
            tmp_path / str(checkpointing),
        )  # fmt: skip
        forwards[checkpointing] = len(calls)
    plain, checkpointed = runs[False], runs[True]
    assert plain.steps == checkpointed.steps == 2
    # Two steps of two micro-batches: four training forwards, and with checkpointing each
    # block runs once more in each backward.
    assert forwards == {False: 4, True: 8}
    assert plain.final["kl"] > 0
    assert_same_steps(plain, checkpointed, rel=1e-6, abs_tol=1e-9, weights_atol=1e-6)


def test_a_model_without_checkpointing_is_refused() -> None:
    class Plain(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(ValueError, match="Plain does not support gradient checkpointing"):
        enable_checkpointing(Plain())
