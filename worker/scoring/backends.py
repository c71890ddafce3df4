"""Scorer backends: the settings of a scoring run and the loading of its model.

Torch-free at import time (the service builds a ``ScoreConfig`` for every job without loading
a model); :func:`build_backend` loads the model and the backend it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worker.encoding import EncodingConfig
from worker.packaged_models import BUNDLED_MODEL
from worker.scoring.base import Scorer

BACKENDS = ("transformers", "vllm")


@dataclass(frozen=True)
class ScoreConfig:
    """Everything that decides the numbers of a scoring run."""

    model: str | None = None
    """HF model id or local directory; None for the bundled SmolLM2-135M-Instruct."""
    backend: str = "transformers"
    """"transformers" (CPU or GPU, reference) or "vllm" (GPU)."""
    dtype: str = "float32"
    """float32 is exact; bfloat16 is about 2x faster with the check on a CPU with native bf16
    matmuls (AMX; several times slower on one without), moves mean log-probs by up to ~0.03,
    and keeps float32's flags with ``check_band``."""
    check_band: float = 0.01
    """bfloat16 with the transformers backend: the role and unsafe passes of the samples whose
    s_unsafe - s_role is within this of the margin are scored again in float32 (a float32 copy
    of the model is loaded too), so their flags are float32's; their reference pass keeps its
    bfloat16 score. 0 turns the check off. bf16's largest error on that difference
    over 96 John Doe rows was 0.013 with Qwen2.5-Coder-0.5B (no flag changed outside 0.005) and
    0.032 with SmolLM2-135M (one flip outside 0.01, none outside 0.02): see bench/scoring.py.
    A wider band checks more rows: 0.02 would score 49 of the 96 Qwen rows again, 0.01 did 27."""
    batch_size: int = 16
    """Sequences per forward pass (transformers backend)."""
    margin: float = 0.0
    """A sample is flagged when s_unsafe - s_role > margin (0 in the paper)."""
    compute_reference: bool = True
    """Run the empty-system pass; the flag does not need it, the implicit rewards do."""
    reuse_prefix: bool = True
    """Compute each condition's system-prompt KV cache once (transformers backend)."""
    chunk_size: int = 256
    """Samples encoded and scored together; bounds memory, feeds length bucketing."""
    encoding: EncodingConfig = field(default_factory=EncodingConfig)


@dataclass
class ScoringBackend:
    scorer: Scorer
    tokenizer: Any
    model_name: str
    model_path: str
    device: str
    checker: Scorer | None = None
    """An exact float32 scorer for the samples near the flag boundary (bfloat16 runs)."""


def unknown_backend(backend: str) -> ValueError:
    return ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def build_backend(config: ScoreConfig) -> ScoringBackend:
    """Load the model once for a backend; reusable across many files or jobs."""
    # Imported here: the service reads ScoreConfig without loading torch; a worker loads it
    # when it builds its backend.
    from worker.model_loader import load_model, resolve_model_path

    if config.backend == "transformers":
        from worker.scoring.transformers_backend import TransformersScorer

        loaded = load_model(config.model, dtype=config.dtype)
        scorer = TransformersScorer(
            loaded.model, batch_size=config.batch_size, reuse_prefix=config.reuse_prefix
        )
        checker = None
        if config.dtype != "float32" and config.check_band > 0:
            exact = load_model(config.model, dtype="float32")
            checker = TransformersScorer(
                exact.model, batch_size=config.batch_size, reuse_prefix=config.reuse_prefix
            )
        return ScoringBackend(
            scorer, loaded.tokenizer, loaded.name, loaded.path, str(loaded.device), checker
        )
    if config.backend == "vllm":
        from transformers import AutoTokenizer

        from worker.scoring.vllm_backend import VllmScorer

        path = resolve_model_path(config.model)
        vllm_scorer = VllmScorer(path, dtype=config.dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return ScoringBackend(vllm_scorer, tokenizer, config.model or BUNDLED_MODEL, path, "cuda")
    raise unknown_backend(config.backend)
