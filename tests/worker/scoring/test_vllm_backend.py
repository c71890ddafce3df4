"""The vLLM backend where vLLM is missing: its error names what to install.

Where vLLM is installed the backend itself is tested in tests/vllm/ (``make test`` runs that
folder in the environment ``make install-vllm`` builds).
"""

from __future__ import annotations

import pytest

from worker.scoring.backends import ScoreConfig, build_backend
from worker.vllm_engine import VllmEngineOptions, engine_kwargs, vllm_available


def test_missing_vllm_says_what_to_install() -> None:
    available, why = vllm_available()
    if available:
        pytest.skip("vLLM is installed here")
    assert "make install-vllm" in why
    from worker.vllm_engine import VllmUnavailableError

    with pytest.raises(VllmUnavailableError, match="make install-vllm"):
        build_backend(ScoreConfig(backend="vllm", dtype="bfloat16", check_band=0.0))


def test_unknown_backend_is_refused_before_any_model_loads() -> None:
    with pytest.raises(ValueError, match="transformers, vllm"):
        build_backend(ScoreConfig(backend="onnx"))


def test_cpu_engine_reserves_a_fixed_kv_cache_and_skips_compilation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import worker.vllm_engine as engine

    monkeypatch.setattr(engine, "vllm_device", lambda: "cpu")
    options = VllmEngineOptions()
    cpu = engine_kwargs("m", dtype="bfloat16", seed=0, options=options, enable_prefix_caching=True)
    assert cpu["kv_cache_memory_bytes"] == 2 << 30
    assert "gpu_memory_utilization" not in cpu
    assert cpu["enforce_eager"] is True
    assert cpu["block_size"] == 32
    monkeypatch.setattr(engine, "vllm_device", lambda: "cuda")
    gpu = engine_kwargs(
        "m",
        dtype="bfloat16",
        seed=0,
        options=options,
        enable_prefix_caching=False,
        enable_lora=True,
    )
    assert gpu["gpu_memory_utilization"] == 0.85
    assert "kv_cache_memory_bytes" not in gpu and "block_size" not in gpu
    assert gpu["enforce_eager"] is False
    assert gpu["enable_lora"] is True and gpu["max_lora_rank"] == 64
    assert gpu["max_num_batched_tokens"] >= gpu["max_model_len"]
