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
from worker.vllm_engine import VllmEngineOptions

BACKENDS = ("transformers", "vllm")

CHECK_BANDS = {"transformers": 0.01, "vllm": 0.03}
"""The float32 check's default band per backend, a few times bf16's largest error on
s_unsafe - s_role measured against float32. transformers: 0.013 over 96 John Doe rows with
Qwen2.5-Coder-0.5B (no flag changed outside 0.005) and 0.032 with SmolLM2-135M (one flip
outside 0.01, none outside 0.02; bench/scoring.py). vLLM (its own kernels, and rounding that
depends on the batch): 0.013 on 14 Jack Sparrow samples with SmolLM2, 0.018 on 24 with the Qwen
model (whose differences lie close to 0: 0.03 sends 13 of those 24 to the check)."""


@dataclass(frozen=True)
class ScoreConfig:
    """Everything that decides the numbers of a scoring run."""

    model: str | None = None
    """HF model id or local directory; None for the bundled SmolLM2-135M-Instruct."""
    backend: str = "transformers"
    """"transformers" (CPU or GPU, the reference) or "vllm" (GPU, or CPU with vLLM's CPU
    build: ``make install-vllm``)."""
    dtype: str = "float32"
    """float32 is exact; bfloat16 is about 2x faster with the check on a CPU with native bf16
    matmuls (AMX; several times slower on one without), moves mean log-probs by up to ~0.03,
    and keeps float32's flags with ``check_band``."""
    check_band: float | None = None
    """bfloat16: the role and unsafe passes of the samples whose s_unsafe - s_role is within
    this of the margin are scored again in float32 by the transformers engine (a float32 copy
    of the model is loaded too), so their flags are float32's; their reference pass keeps its
    bfloat16 score. 0 turns the check off; None takes the backend's measured default,
    ``CHECK_BANDS``. A wider band checks more rows: with the transformers backend, 0.02 would
    score 49 of 96 Qwen rows again, 0.01 did 27."""
    batch_size: int = 16
    """Sequences per forward pass (transformers backend)."""
    margin: float = 0.0
    """A sample is flagged when s_unsafe - s_role > margin (0 in the paper)."""
    compute_reference: bool = True
    """Run the empty-system pass; the flag does not need it, the implicit rewards do."""
    reuse_prefix: bool = True
    """Compute each condition's system-prompt KV cache once and reuse it for every sample
    (both backends; vLLM through its prefix cache, never for a response position)."""
    chunk_size: int = 256
    """Samples encoded and scored together; bounds memory, feeds length bucketing."""
    encoding: EncodingConfig = field(default_factory=EncodingConfig)

    @property
    def band(self) -> float:
        """The float32 check's band in effect (``check_band``, or the backend's default)."""
        if self.check_band is not None:
            return self.check_band
        return CHECK_BANDS.get(self.backend, CHECK_BANDS["transformers"])


@dataclass
class ScoringBackend:
    scorer: Scorer
    tokenizer: Any
    model_name: str
    model_path: str
    device: str
    checker: Scorer | None = None
    """An exact float32 scorer for the samples near the flag boundary (bfloat16 runs)."""

    def close(self) -> None:
        """Release what outlives a Python reference: a vLLM engine's processes."""
        close = getattr(self.scorer, "close", None)
        if close is not None:
            close()


def unknown_backend(backend: str) -> ValueError:
    return ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def build_backend(
    config: ScoreConfig, engine_options: VllmEngineOptions | None = None
) -> ScoringBackend:
    """Load the model once for a backend; reusable across many files or jobs.

    ``engine_options``: how a vLLM engine starts (memory, compilation); ignored by the
    transformers backend."""
    # Imported here: the service reads ScoreConfig without loading torch; a worker loads it
    # when it builds its backend.
    from worker.model_loader import load_model, resolve_model_path

    if config.backend not in BACKENDS:
        raise unknown_backend(config.backend)
    checker = None
    if config.dtype != "float32" and config.band > 0:
        from worker.scoring.transformers_backend import TransformersScorer

        exact = load_model(config.model, dtype="float32")
        checker = TransformersScorer(
            exact.model, batch_size=config.batch_size, reuse_prefix=config.reuse_prefix
        )
    if config.backend == "vllm":
        from transformers import AutoTokenizer

        from worker.scoring.vllm_backend import VllmScorer
        from worker.vllm_engine import vllm_device

        path = resolve_model_path(config.model)
        vllm_scorer = VllmScorer(
            path, dtype=config.dtype, reuse_prefix=config.reuse_prefix, options=engine_options
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
        name = config.model or BUNDLED_MODEL
        return ScoringBackend(vllm_scorer, tokenizer, name, path, vllm_device(), checker)
    from worker.scoring.transformers_backend import TransformersScorer

    loaded = load_model(config.model, dtype=config.dtype)
    scorer = TransformersScorer(
        loaded.model, batch_size=config.batch_size, reuse_prefix=config.reuse_prefix
    )
    return ScoringBackend(
        scorer, loaded.tokenizer, loaded.name, loaded.path, str(loaded.device), checker
    )
