"""Tenant scoping: every object lookup goes through here, so another tenant's id is a 404."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.errors import NotFound

T = TypeVar("T")


def get_owned(
    session: Session, model: type[T], object_id: str, tenant_id: str, *, what: str, param: str
) -> T:
    table: Any = model
    if "\x00" in object_id:  # no id holds one, and Postgres refuses it in a query
        raise NotFound(f"no {what} {object_id!r}", param=param)
    obj = session.scalar(select(model).where(table.id == object_id, table.tenant_id == tenant_id))
    if obj is None:
        raise NotFound(f"no {what} {object_id!r}", param=param)
    return obj
