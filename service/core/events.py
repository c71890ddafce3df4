"""Job events: one table for every job kind, listed newest first with an ``evt_<id>`` cursor."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.errors import APIError
from service.core.pagination import EVENT_ID, ListParams, ListResponse, paginate
from service.models import JobEvent


class EventOut(BaseModel):
    id: str
    object: str
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None


def timestamp(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def add_event(
    session: Session, job_id: str, message: str, level: str = "info", **data: object
) -> None:
    session.add(JobEvent(job_id=job_id, level=level, message=message, data=data or None))


def event_out(event: JobEvent, kind: str) -> EventOut:
    return EventOut(
        id=f"evt_{event.id}",
        object=f"{kind}.event",
        created_at=int(event.created_at.timestamp()),
        level=event.level,
        message=event.message,
        data=event.data,
    )


def list_events(
    session: Session, job_id: str, params: ListParams, kind: str
) -> ListResponse[EventOut]:
    """A page of the job's events, newest first (``after``: an event id such as evt_42)."""
    after = None
    if params.after is not None:
        if not re.fullmatch(EVENT_ID, params.after):
            raise APIError("after must be an event id such as evt_42", param="after")
        after = int(params.after.removeprefix("evt_"))
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    rows, more = paginate(session, stmt, JobEvent.id, params, after)
    return ListResponse(data=[event_out(e, kind) for e in rows], has_more=more)
