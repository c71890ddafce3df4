"""Request-scoped dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.core.db import get_read_sessionmaker, session_scope
from service.core.errors import Unprocessable

READ_ONLY_METHODS = frozenset({"GET", "HEAD"})


def get_session(request: Request) -> Iterator[Session]:
    """One session per request: commit on success, roll back on any error; reads (GET, HEAD)
    run in autocommit, as each of their queries sees committed data anyway."""
    if request.method in READ_ONLY_METHODS:
        session = get_read_sessionmaker()()
        try:
            yield session
        finally:
            session.close()
        return
    with session_scope() as session:
        yield session


# scope="function": the commit (and the enqueues that follow it) runs when the endpoint
# returns, before the response is sent, so a 2xx always names committed rows and a failing
# commit becomes an error response. FastAPI's default ("request") would commit after sending.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def single_valued_query(request: Request) -> None:
    """Refuse a query parameter given twice: every one of the API's takes one value, and
    FastAPI would silently keep the last (``?limit=5&limit=x`` read as ``limit=x``)."""
    names = [name for name, _ in request.query_params.multi_items()]
    if len(names) != len(set(names)):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise Unprocessable(
            f"query parameter {repeated[0]!r} is given more than once; give it once",
            param=repeated[0],
        )
