"""Request and response bodies of the review API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.json_types import INTEGRAL_FLOAT_AS_INT

NOTE_MAX = 2000
BULK_MAX = 1000
INDEX_MAX = 2**31 - 1
# JSON Schema counts 7.0 as an integer: the validator after the bounds keeps them in the schema.
SampleIndex = Annotated[int, Field(ge=0, le=INDEX_MAX), INTEGRAL_FLOAT_AS_INT]
Decision = Literal["flag", "keep"]
SampleOrder = Literal["difference_desc", "difference_asc", "index"]


class MessageOut(BaseModel):
    role: str
    content: str


class ReviewOut(BaseModel):
    decision: Decision
    note: str | None
    reviewer: str = Field(description="The name of the API key that decided.")
    reviewed_at: int


class SampleOut(BaseModel):
    object: Literal["scoring_job.sample"] = "scoring_job.sample"
    index: int = Field(description="0-based position in the dataset.")
    line: int = Field(description="1-based line (JSONL) or item (JSON array) in the upload.")
    messages: list[MessageOut]
    scores: dict[str, Any] = Field(description="The scoring job's scores of the sample.")
    difference: float | None = Field(
        description="s_unsafe - s_role (the scores' delta); null where not finite."
    )
    rds_flagged: bool = Field(description="RDS's flag: difference > the job's margin.")
    flagged: bool = Field(description="The effective flag: the review's decision, else RDS's.")
    review: ReviewOut | None


class ReviewIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    decision: Decision | None = Field(
        description="flag or keep; null clears the review (RDS's flag stands again)."
    )
    note: str | None = Field(
        default=None,
        max_length=NOTE_MAX,
        description="Why; kept with the review, and in the audit event (a clearing's reason too).",
    )


class BulkReviewIn(ReviewIn):
    indices: list[SampleIndex] = Field(
        min_length=1, max_length=BULK_MAX, description="Sample indices."
    )


class Decisions(BaseModel):
    flag: int
    keep: int


class Overrides(BaseModel):
    to_flag: int = Field(description="Flagged by a reviewer, not by RDS.")
    to_keep: int = Field(description="Flagged by RDS, kept by a reviewer.")


class CurationOut(BaseModel):
    object: Literal["scoring_job.curation"] = "scoring_job.curation"
    job_id: str
    total: int
    rds_flagged: int
    flagged: int = Field(description="Effectively flagged: what downloads and fine-tuning use.")
    reviewed: int
    decisions: Decisions
    overrides: Overrides
    updated: int | None = Field(default=None, description="Bulk review: samples changed.")


class MeOut(BaseModel):
    object: Literal["api_key"] = "api_key"
    tenant: str
    name: str = Field(description="The key's name, recorded with its reviews.")
