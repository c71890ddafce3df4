"""The vLLM tests: they run in the environment ``make install-vllm`` builds (``.venv-vllm``),
where ``make test`` runs this folder after the main suite; elsewhere they are skipped.

Each module starts at most one engine (a vLLM engine on a CPU reserves its KV cache in RAM and
takes 20-40 s to start) and shares it through a module-scoped fixture.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.vllm_engine import VllmEngineOptions, shutdown_llm, vllm_available

__all__ = ["TEST_ENGINE", "shutdown_llm"]

AVAILABLE, WHY = vllm_available()

# Small enough to run beside the other tests' models on a 24 GiB machine.
TEST_ENGINE = VllmEngineOptions(kv_cache_gib=1.0, max_model_len=2048)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if AVAILABLE:
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=WHY)
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    from tests.conftest import model_cache_dir
    from worker.model_loader import materialize_packaged
    from worker.packaged_models import QWEN_CODER_05B

    if not QWEN_CODER_05B.installed():
        pytest.skip(f"{QWEN_CODER_05B.name} is not installed: {QWEN_CODER_05B.install_command}")
    return materialize_packaged(QWEN_CODER_05B, model_cache_dir())


@pytest.fixture(autouse=True, scope="session")
def _vllm_environment() -> Iterator[None]:
    # The engine's process is spawned: forking a process that already ran torch is unsafe.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    yield
