from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator


class RoleCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="The character's name.")
    profile: str = Field(min_length=1, max_length=50_000, description="Character profile.")
    role_prompt: str | None = Field(
        default=None, max_length=50_000, description="Full custom role system prompt."
    )
    unsafe_prompt: str | None = Field(
        default=None, max_length=50_000, description="Full custom unsafe system prompt."
    )

    @model_validator(mode="after")
    def both_or_neither(self) -> RoleCreate:
        if (self.role_prompt is None) != (self.unsafe_prompt is None):
            raise ValueError("give both role_prompt and unsafe_prompt, or neither")
        if not self.name.strip() or not self.profile.strip():
            raise ValueError("name and profile must not be blank")
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
