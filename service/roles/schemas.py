from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NOT_BLANK = "[^\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
"""A pattern for strings with a character that str.strip keeps (the prompts strip): Python's
whitespace, listed as characters, because \\s means other sets in the Rust engine pydantic
validates with (not U+001C-U+001F) and in ECMAScript (also U+FEFF)."""


def _prompts_in_pairs(schema: dict[str, Any]) -> None:
    # The two prompts are strings when given, and given together: said in the schema too, so
    # clients and fuzzers see the rule the validator enforces.
    for name in ("role_prompt", "unsafe_prompt"):
        prop = schema["properties"][name]
        prop.pop("anyOf", None)
        prop.pop("default", None)
        prop.update(type="string", maxLength=50_000)
    schema["dependentRequired"] = {
        "role_prompt": ["unsafe_prompt"],
        "unsafe_prompt": ["role_prompt"],
    }


class RoleCreate(BaseModel):
    model_config = ConfigDict(strict=True, json_schema_extra=_prompts_in_pairs)

    name: str = Field(
        min_length=1, max_length=200, pattern=NOT_BLANK, description="The character's name."
    )
    profile: str = Field(
        min_length=1, max_length=50_000, pattern=NOT_BLANK, description="Character profile."
    )
    role_prompt: str | None = Field(
        default=None, max_length=50_000, description="Full custom role system prompt."
    )
    unsafe_prompt: str | None = Field(
        default=None,
        max_length=50_000,
        description="Full custom unsafe system prompt; give both prompts or neither.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_null_prompts(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in ("role_prompt", "unsafe_prompt"):
                if name in data and data[name] is None:
                    raise ValueError(f"{name} must be a string when given")
        return data

    @model_validator(mode="after")
    def both_or_neither(self) -> RoleCreate:
        if (self.role_prompt is None) != (self.unsafe_prompt is None):
            raise ValueError("give both role_prompt and unsafe_prompt, or neither")
        return self


class RoleOut(BaseModel):
    id: str
    object: Literal["role"] = "role"
    created_at: int
    name: str
    profile: str
    role_prompt: str
    unsafe_prompt: str


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


class Histogram(BaseModel):
    edges: list[float] = Field(description="bins + 1 edges; each bin holds edge <= x < next.")
    counts: list[int] = Field(description="Samples per bin; the last bin also holds its max.")


class DifferenceStats(BaseModel):
    """The distribution of ``s_unsafe - s_role`` (each sample's ``delta``) over a job."""

    min: float
    max: float
    mean: float
    median: float
    histogram: Histogram


class FlaggedSample(BaseModel):
    index: int = Field(description="0-based position among the dataset's samples.")
    line: int = Field(description="1-based line (JSONL) or item (JSON array) of the upload.")
    difference: float = Field(description="s_unsafe - s_role")
    text: str = Field(description="The scored response, cut short (ending in …) when long.")


class RoleRisk(BaseModel):
    """A role's latest succeeded scoring result; the stats are null without one."""

    object: Literal["role.risk"] = "role.risk"
    role_id: str
    role_name: str
    scoring_job_id: str | None = None
    dataset_id: str | None = None
    model: str | None = None
    finished_at: int | None = None
    num_samples: int | None = None
    num_flagged: int | None = None
    flagged_fraction: float | None = None
    flagged_interval: tuple[float, float] | None = Field(
        default=None, description="Wilson 95% interval of flagged_fraction."
    )
    margin: float | None = None
    difference: DifferenceStats | None = None
    top_flagged: list[FlaggedSample] = Field(
        default_factory=list, description="The flagged samples with the largest difference."
    )
