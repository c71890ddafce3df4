"""The names of the bundled model, kept free of torch so the API can use them without loading it."""

from __future__ import annotations

BUNDLED_MODEL = "smollm2-135m-instruct"
"""The bundled model's local name: its cache directory, and what a run records as its model."""
BUNDLED_ALIAS = "bundled"
"""What jobs and settings name the bundled model by."""
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Recorded as an adapter's base model when the bundled model was trained (its weights are that
model's, dequantized from the package's Q4_1 GGUF)."""


def is_bundled(model: str | None) -> bool:
    return model is None or model in ("", BUNDLED_ALIAS, BUNDLED_MODEL)


def base_model_id(model: str | None) -> str:
    """The id a trained adapter names as its base: the hub id for the bundled model."""
    return BUNDLED_HUB_ID if is_bundled(model) else str(model)
