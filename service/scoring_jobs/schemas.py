from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.json_types import JSONInt
from worker.scoring.backends import ScoreConfig

_ENGINE = ScoreConfig()  # the engine's defaults, written once there


class ScoringJobCreate(BaseModel):
    # Strict: false is not a margin, 0 is not a boolean (lax mode would coerce both). The
    # integers are JSONInt: 16.0 is the integer 16 to JSON Schema, so it is to the API too.
    model_config = ConfigDict(strict=True)

    dataset_id: str
    model: str | None = Field(default=None, description="Allowed models only; default: server's.")
    backend: Literal["transformers", "vllm"] | None = None
    margin: float = Field(
        default=_ENGINE.margin, ge=-100, le=100, description="Flag if s_unsafe-s_role > margin."
    )
    compute_reference: bool = Field(
        default=_ENGINE.compute_reference, description="Run the empty-system pass."
    )
    batch_size: JSONInt = Field(default=_ENGINE.batch_size, ge=1, le=512)


class Progress(BaseModel):
    processed: int
    total: int


class ScoringJobOut(BaseModel):
    id: str
    object: Literal["scoring_job"] = "scoring_job"
    created_at: int
    dataset_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str | None
    backend: str
    dtype: str
    margin: float
    compute_reference: bool
    batch_size: int
    progress: Progress
    started_at: int | None
    finished_at: int | None
    error: str | None
    result: dict[str, Any] | None
