"""The run that tests/trainer/test_data_parallel.py makes with one process and with two."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import build_tiny_model, build_tiny_tokenizer
from tests.trainer.test_train import FLAGS, PROMPTS, SAMPLES
from trainer.checkpoints import CheckpointPolicy
from trainer.config import LoraSettings, TrainConfig
from trainer.train import TrainResult, fine_tune

CASES: dict[str, dict[str, Any]] = {
    # Dropout 0 (the authors'): the processes draw different masks than one process would.
    "lora": {"lora": LoraSettings(r=8, alpha=16), "learning_rate": 1e-2},
    "full": {"lora": None, "learning_rate": 1e-3},
}


def build(case: str) -> tuple[Any, Any, TrainConfig]:
    """The tiny random Llama and tokenizer of the session fixtures (a torchrun process has no
    fixtures), and a config of 5 micro-batches per step (an odd number: one process gets
    more)."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    train = TrainConfig(batch_size=10, micro_batch_size=2, n_epochs=2, **CASES[case])
    return model, tokenizer, train


def run(
    model: Any,
    tokenizer: Any,
    config: TrainConfig,
    out: Path,
    accelerator: Any = None,
    resume: bool = False,
) -> TrainResult:
    return fine_tune(
        model, tokenizer, SAMPLES, FLAGS, PROMPTS, config, out,
        validation=SAMPLES[:3], validation_flags=FLAGS[:3],
        checkpoint_policy=CheckpointPolicy(every=2), resume=resume, accelerator=accelerator,
    )  # fmt: skip
