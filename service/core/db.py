"""Engine, sessions and the declarative base."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import DateTime, MetaData, create_engine, event
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from service.core.config import get_settings
from service.core.state_dirs import secure_state

log = logging.getLogger(__name__)
T = TypeVar("T")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite stores datetimes without a zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while the in-process job writes; FKs are off by default.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(url, pool_size=10, max_overflow=20)
    event.listen(engine, "checkin", _mark_idle)
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


PING_AFTER_IDLE_S = 2.0
"""A pooled connection idle this long is tested before use. pool_pre_ping would test every
checkout: a round trip per request, about a tenth of a status poll's time; a busy pool's
connections stay fresh, and one that sat through a database restart is caught here."""


def _mark_idle(_dbapi_connection: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    since = record.info.get("idle_since")
    if since is None or time.monotonic() - since < PING_AFTER_IDLE_S:
        return
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        dbapi_connection.rollback()  # leave no transaction open: autocommit is set next
    except Exception as exc:
        # The pool drops this connection and checks out another (a fresh one if need be).
        raise DisconnectionError(str(exc)) from exc


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    if settings.sqlalchemy_url.startswith("sqlite"):
        secure_state(settings)
    return make_engine(settings.sqlalchemy_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def get_read_sessionmaker() -> sessionmaker[Session]:
    """Sessions for requests that only read: autocommit, so a GET costs its queries and no
    BEGIN/COMMIT round trips."""
    return _read_sessionmaker(get_engine())


@lru_cache(maxsize=4)  # keyed by the engine: a new engine (tests, settings) gets its own
def _read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    return sessionmaker(bind=autocommit, expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session for jobs and scripts: commit on success, roll back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


TRANSIENT_ERRORS = (OperationalError, InterfaceError)
"""What a database restart or a dropped connection raises; pool_pre_ping reconnects after."""


def retry_transient(work: Callable[[], T], grace_s: float, what: str) -> T:
    """Run ``work`` again, with backoff, while the database is unreachable, for up to
    ``grace_s`` seconds; ``work`` must be safe to repeat (each of its transactions idempotent)."""
    deadline = time.monotonic() + grace_s
    wait = 0.5
    while True:
        try:
            return work()
        except TRANSIENT_ERRORS as exc:
            if time.monotonic() + wait > deadline:
                raise
            log.warning("%s: database unreachable (%s); retrying in %.1f s", what, exc, wait)
            time.sleep(wait)
            wait = min(2 * wait, 5.0)


def after_commit(session: Session, callback: Callable[[], object]) -> None:
    """Run ``callback`` once the session's transaction has committed (e.g. enqueue a job)."""

    def run(_session: Session) -> None:
        callback()

    event.listen(session, "after_commit", run, once=True)
