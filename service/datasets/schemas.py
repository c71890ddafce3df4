from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class DatasetOut(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    created_at: int
    role_id: str
    filename: str
    num_samples: int
    format: str
    bytes: int
    sha256: str
    status: str


class LineErrorOut(BaseModel):
    line: int
    message: str
