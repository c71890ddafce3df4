"""Cursor pagination in the OpenAI style: newest first, ``after`` an id, ``limit``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

T = TypeVar("T")


class ListResponse(BaseModel, Generic[T]):
    object: str = "list"
    data: list[T]
    has_more: bool


class ListParams(BaseModel):
    after: str | None = None
    limit: int = 20


def list_params(
    after: Annotated[str | None, Query(description="Return objects after this id.")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size (1-100).")] = 20,
) -> ListParams:
    return ListParams(after=after, limit=limit)


EVENT_ID = r"^evt_[0-9]{1,18}$"


def event_list_params(
    after: Annotated[
        str | None, Query(pattern=EVENT_ID, description="Return events after this one (evt_42).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size (1-100).")] = 20,
) -> ListParams:
    return ListParams(after=after, limit=limit)


def paginate(
    session: Session,
    stmt: Select[Any],
    key: InstrumentedAttribute[Any],
    params: ListParams,
    after_value: Any = None,
) -> tuple[Sequence[Any], bool]:
    """Rows ordered by ``key`` descending, strictly after the cursor."""
    if after_value is not None:
        stmt = stmt.where(key < after_value)
    rows = session.scalars(stmt.order_by(key.desc()).limit(params.limit + 1)).all()
    return rows[: params.limit], len(rows) > params.limit
