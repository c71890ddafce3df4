"""One error type with a status and a stable JSON body, and the handlers that render it."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)


class APIError(Exception):
    status_code = 400
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {
            "error": {"code": self.code, "message": self.message, "param": self.param, **self.extra}
        }


class Unauthorized(APIError):
    status_code = 401
    code = "invalid_api_key"


class NotFound(APIError):
    status_code = 404
    code = "not_found"


class Conflict(APIError):
    status_code = 409
    code = "conflict"


class Unprocessable(APIError):
    """A well-formed body whose values do not fit together or do not fit the server."""

    status_code = 422


class PayloadTooLarge(APIError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(APIError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidFile(APIError):
    status_code = 422
    code = "invalid_file"


class ServiceUnavailable(APIError):
    """A dependency (the database, the job queue) is unreachable; retry later."""

    status_code = 503
    code = "service_unavailable"


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "A body that cannot be parsed (not JSON, not a multipart form)"},
    401: {"description": "Missing or unknown API key"},
    404: {"description": "No such object for this tenant"},
    422: {"description": "The body or parameters do not validate"},
    503: {"description": "The database or the job queue is unreachable; nothing was stored"},
}


def _error(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"code": code, "message": message, "param": param}}
    )


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return JSONResponse(status_code=exc.status_code, content=exc.body(), headers=headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
    message = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
        for e in exc.errors()[:10]
    )
    return _error(422, "invalid_request", message, ".".join(loc) or None)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {
        400: "invalid_request",
        404: "not_found",
        405: "method_not_allowed",
        413: "payload_too_large",
    }
    response = _error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        response.headers["Allow"] = ", ".join(_allowed_methods(request))
    return response


def _allowed_methods(request: Request) -> list[str]:
    """Every method of every route on this path: Starlette names only the first route's, and
    GET and POST on one path are two routes here."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    methods.discard("HEAD")  # implied by GET, and not in the OpenAPI document
    return sorted(methods)


async def _model_error(_request: Request, exc: Exception) -> JSONResponse:
    """A request value that one of the API's own models refused after parsing (e.g. an inline
    role built from form fields): the client's input, so a 422, never a 500."""
    assert isinstance(exc, ValidationError)
    message = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg')}"
        for e in exc.errors()[:10]
    )
    return _error(422, "invalid_request", message)


async def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    """The database went away (restart, network) during the request: nothing was committed."""
    log.warning("database unavailable: %s", exc)
    return _error(
        503, "database_unavailable", "the database is unreachable; nothing was stored, retry"
    )


async def _data_error(_request: Request, exc: Exception) -> JSONResponse:
    """The database refused a value the schema allows, e.g. a NUL character in a string."""
    first = str(getattr(exc, "orig", exc)).splitlines()[0]
    return _error(422, "invalid_request", f"a value cannot be stored: {first}")


async def _queue_error(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("queue unavailable: %s", exc)
    return _error(503, "queue_unavailable", "the job queue (Redis) is unreachable; retry")


async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the traceback after this handler has answered.
    return _error(500, "internal_error", f"internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(ValidationError, _model_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(InterfaceError, _database_error)
    app.add_exception_handler(RedisConnectionError, _queue_error)
    app.add_exception_handler(RedisTimeoutError, _queue_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
