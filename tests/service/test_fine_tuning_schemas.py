"""The fine-tuning API's request schemas take every default from the trainer's dataclasses."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import Any

import pytest
from pydantic import BaseModel

from service.core.errors import Unprocessable
from service.fine_tuning.schemas import EvaluationIn, Hyperparameters, JudgeIn, LoraIn
from service.fine_tuning.service import eval_config, train_config
from tests.service.conftest import REPO
from trainer.config import (
    FULL_FT_LEARNING_RATE,
    LORA_LEARNING_RATE,
    EvalConfig,
    JudgeSettings,
    LoraSettings,
    TrainConfig,
)
from worker.encoding import EncodingConfig

# Request fields whose default the service derives instead of copying one.
DERIVED = {
    "learning_rate",
    "micro_batch_size",
    "max_prompt_tokens",
    "max_response_tokens",
    "safety_sets",
}


def _default(value: Any) -> Any:
    """As JSON: a nested model or dataclass as an object, tuples as lists."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value))


def _schema_defaults(schema: type[BaseModel]) -> dict[str, Any]:
    return {
        name: _default(field.get_default(call_default_factory=True))
        for name, field in schema.model_fields.items()
        if name not in DERIVED
    }


def _dataclass_defaults(config: Any, names: set[str]) -> dict[str, Any]:
    return {name: _default(getattr(config, name)) for name in names}


def test_every_request_default_is_the_trainers() -> None:
    for schema, config in (
        (Hyperparameters, TrainConfig()),
        (LoraIn, LoraSettings()),
        (EvaluationIn, EvalConfig()),
        (JudgeIn, JudgeSettings()),
    ):
        given = _schema_defaults(schema)
        assert given, schema
        assert given == _dataclass_defaults(config, set(given)), schema.__name__


def test_an_empty_request_gives_the_trainers_configs() -> None:
    lora = train_config("sarft", Hyperparameters())
    assert lora == TrainConfig(micro_batch_size=4, learning_rate=LORA_LEARNING_RATE)
    full = train_config("sarft", Hyperparameters(lora=None))
    assert full.lora is None and full.learning_rate == FULL_FT_LEARNING_RATE
    assert (lora.max_prompt_tokens, lora.max_response_tokens) == (512, 128)  # the scoring's
    assert train_config("sarft", Hyperparameters(gradient_checkpointing=True)) == (
        dataclasses.replace(lora, gradient_checkpointing=True)
    )
    evaluation = eval_config(EvaluationIn(safety_sets=[{"name": "builtin"}]))  # type: ignore[list-item]
    assert dataclasses.replace(evaluation, safety_sets=()) == EvalConfig()
    assert EvalConfig.from_dict(evaluation.to_dict()) == evaluation


def test_the_evaluation_backend_reaches_the_trainer() -> None:
    """The API takes vLLM on trust: the training worker checks for it (the job fails, saying
    what is missing, before it trains)."""
    sets = [{"name": "builtin"}]
    vllm = eval_config(EvaluationIn(safety_sets=sets, backend="vllm"))  # type: ignore[arg-type]
    assert vllm.backend == "vllm" and EvalConfig.from_dict(vllm.to_dict()) == vllm
    with pytest.raises(ValueError, match="backend"):
        EvaluationIn.model_validate({"backend": "sglang"})


def test_an_optimizer_in_the_backward_takes_the_batch_in_one_micro_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.core.config import get_settings

    hp = Hyperparameters(batch_size=6, lora=None, optimizer_in_backward=True, max_grad_norm=None)
    config = train_config("sarft", hp)
    assert config.optimizer_in_backward and config.micro_batch_size == 6
    assert config.max_grad_norm is None
    for bad, needle in (
        ({"max_grad_norm": 1.0}, "set max_grad_norm to None"),
        ({"micro_batch_size": 3}, "set micro_batch_size to batch_size"),
    ):
        with pytest.raises(Unprocessable, match=needle):
            train_config("sarft", hp.model_copy(update=bad))
    monkeypatch.setenv("SARFT_TRAINING_PROCESSES", "2")
    get_settings.cache_clear()
    try:
        with pytest.raises(Unprocessable, match="one process; this server trains in 2"):
            train_config("sarft", hp)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_truncation_is_the_scoring_jobs() -> None:
    """The flags belong to the scoring encoding: a request may repeat it, not change it."""
    scoring = EncodingConfig(max_prompt_tokens=300, max_response_tokens=64)
    config = train_config("sarft", Hyperparameters(), scoring)
    assert (config.max_prompt_tokens, config.max_response_tokens) == (300, 64)
    assert train_config("sarft", Hyperparameters(max_prompt_tokens=300), scoring) == config
    with pytest.raises(Unprocessable, match="max_prompt_tokens must be the scoring job's"):
        train_config("sarft", Hyperparameters(max_prompt_tokens=512), scoring)


def test_the_api_imports_no_training_stack() -> None:
    """The API never loads a model: importing it (routes, tasks to enqueue) loads no torch."""
    code = (
        "import sys, service.app, service.scoring_jobs.tasks, service.fine_tuning.tasks; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'matplotlib') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
