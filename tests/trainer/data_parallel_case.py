"""The run that tests/trainer/test_data_parallel.py makes with one process and with two."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.conftest import NO_SYSTEM_TEMPLATE, TINY_SHAPE, model_cache_dir
from tests.trainer.test_train import FLAGS, PROMPTS, SAMPLES
from trainer.checkpoints import CheckpointPolicy
from trainer.config import LoraSettings, TrainConfig
from trainer.train import TrainResult, fine_tune
from worker.model_loader import materialize_bundled

CASES: dict[str, dict[str, Any]] = {
    # Dropout 0 (the authors'): the processes draw different masks than one process would.
    "lora": {"lora": LoraSettings(r=8, alpha=16), "learning_rate": 1e-2},
    "full": {"lora": None, "learning_rate": 1e-3},
}


def build(case: str) -> tuple[Any, Any, TrainConfig]:
    """The tiny random Llama and the bundled tokenizer, built as the session fixtures build
    them, and a config of 5 micro-batches per step (an odd number: one process gets more)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(materialize_bundled(model_cache_dir()))
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    config = LlamaConfig(
        **TINY_SHAPE,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).float()
    train = TrainConfig(batch_size=10, micro_batch_size=2, n_epochs=2, **CASES[case])
    return model, tokenizer, train


def run(
    model: Any, tokenizer: Any, config: TrainConfig, out: Path, accelerator: Any = None
) -> TrainResult:
    return fine_tune(
        model, tokenizer, SAMPLES, FLAGS, PROMPTS, config, out,
        checkpoint_policy=CheckpointPolicy(every=2), accelerator=accelerator,
    )  # fmt: skip
