"""``EvalConfig.backend``: the field, and a run that asks for vLLM where there is none.

The vLLM path itself is tested in tests/vllm (the environment ``make install-vllm`` builds);
these need no vLLM.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.test_train import FLAGS, PROMPTS, SAMPLES, quick_config
from trainer import pipeline, vllm_generation
from trainer.config import EvalConfig, LoraSettings, SafetySet
from trainer.run_spec import RunInputs
from worker.vllm_engine import VllmEngineOptions, VllmUnavailableError

NO_VLLM = importlib.util.find_spec("vllm") is None


def test_backend_defaults_to_transformers_and_is_checked() -> None:
    assert EvalConfig().backend == "transformers"
    assert EvalConfig(backend="vllm").backend == "vllm"
    with pytest.raises(ValueError, match="evaluation backend must be one of transformers, vllm"):
        EvalConfig(backend="sglang")  # type: ignore[arg-type]


def test_backend_round_trips_and_old_configs_load_as_transformers() -> None:
    plan = EvalConfig(safety_sets=(SafetySet("advbench"),), backend="vllm")
    stored = plan.to_dict()
    assert stored["backend"] == "vllm"
    assert EvalConfig.from_dict(stored) == plan
    del stored["backend"]  # a job stored before there was a backend
    assert EvalConfig.from_dict(stored).backend == "transformers"


def _vllm_inputs(lora_r: int = 8) -> RunInputs:
    scores = [{"flagged": bool(f)} for f in FLAGS]
    return RunInputs(
        run_id="ftjob_vllm",
        model="unused: the run must fail before it loads a model",
        config=quick_config(max_steps=1, lora=LoraSettings(r=lora_r, alpha=16)),
        evaluation=EvalConfig(safety_sets=(SafetySet("inline", ("Lock",)),), backend="vllm"),
        prompts=PROMPTS,
        samples=SAMPLES,
        scores=scores,
        margin=0.0,
    )


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the vLLM check")

    monkeypatch.setattr(pipeline, "load_model", refuse)


@pytest.mark.skipif(not NO_VLLM, reason="vLLM is installed here")
@pytest.mark.usefixtures("no_model")
def test_a_vllm_run_without_vllm_fails_before_loading_the_model(tmp_path: Path) -> None:
    with pytest.raises(VllmUnavailableError) as raised:
        pipeline.run_fine_tuning(_vllm_inputs(), tmp_path / "run")
    message = str(raised.value)
    assert "evaluation.backend 'vllm' needs vLLM where the run trains" in message
    assert "vLLM is not installed" in message and "make install-vllm" in message


@pytest.mark.usefixtures("no_model")
def test_the_error_says_what_vllm_available_found_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    why = "vLLM found no device it supports here (platform 'rocm')"
    monkeypatch.setattr(vllm_generation, "vllm_available", lambda: (False, why))
    with pytest.raises(VllmUnavailableError, match=r"needs vLLM where the run trains: .*'rocm'"):
        pipeline.run_fine_tuning(_vllm_inputs(), tmp_path / "run")


@pytest.mark.usefixtures("no_model")
def test_a_lora_rank_above_the_engines_limit_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm_generation, "vllm_available", lambda: (True, ""))
    with pytest.raises(ValueError, match=r"LoRA rank 128 is above .* max_lora_rank \(64\)"):
        pipeline.run_fine_tuning(
            _vllm_inputs(lora_r=128), tmp_path / "run", vllm_options=VllmEngineOptions()
        )


def test_the_engine_serves_an_adapter_at_its_own_rank(tmp_path: Path) -> None:
    """vLLM's CPU kernels cost grows with the engine's max_lora_rank: it is cut to the adapter's."""
    (tmp_path / "adapter_config.json").write_text('{"r": 8, "rank_pattern": {"q_proj": 12}}')
    assert vllm_generation.adapter_rank(tmp_path) == 12
    options = vllm_generation.lora_options(tmp_path, VllmEngineOptions(max_lora_rank=64))
    assert options.max_lora_rank == 16  # the smallest rank vLLM accepts that holds 12
    with pytest.raises(ValueError, match="above the vLLM engine's max_lora_rank"):
        vllm_generation.lora_options(tmp_path, VllmEngineOptions(max_lora_rank=8))
