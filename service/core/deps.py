"""Request-scoped dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from service.core.db import session_scope


def get_session() -> Iterator[Session]:
    """One session per request: commit on success, roll back on any error."""
    with session_scope() as session:
        yield session


# scope="function": the commit (and the enqueues that follow it) runs when the endpoint
# returns, before the response is sent, so a 2xx always names committed rows and a failing
# commit becomes an error response. FastAPI's default ("request") would commit after sending.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
