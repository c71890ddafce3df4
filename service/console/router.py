"""Serves the console's static files under /console, with a strict Content-Security-Policy.

The console is one HTML page, plain ES modules and one stylesheet: no framework and no build
step, so what is in ``static/`` is exactly what the browser runs. The page itself needs no
API key (it holds no data); every call it makes sends the key the user signs in with.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

STATIC_DIR = Path(__file__).with_name("static")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""No inline script or style anywhere: an injected string can neither run nor restyle the
page, and nothing loads from another origin."""

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def _allowed_files() -> dict[str, Path]:
    """The files the console may serve, read once: a request names one of these or gets a 404,
    so no path from the URL ever reaches the file system."""
    return {
        path.name: path
        for path in sorted(STATIC_DIR.iterdir())
        if path.is_file() and path.suffix in MEDIA_TYPES and path.name != "index.html"
    }


STATIC_FILES = _allowed_files()

router = APIRouter(prefix="/console", include_in_schema=False)


def _index() -> FileResponse:
    # no-store: the page is tiny, and a stale copy after an upgrade would load stale modules.
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type=MEDIA_TYPES[".html"],
        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"},
    )


@router.get("")
def console_index() -> Response:
    return _index()


@router.get("/")
def console_index_slash() -> Response:
    return _index()


@router.get("/static/{name}")
def console_static(name: str) -> Response:
    path = STATIC_FILES.get(name)
    if path is None:
        return JSONResponse(
            status_code=404,
            content={
                "error": {"code": "not_found", "message": f"no console file {name}", "param": None}
            },
            headers=SECURITY_HEADERS,
        )
    # no-cache: the browser revalidates (ETag), so an upgraded server's modules are picked up.
    return FileResponse(
        path,
        media_type=MEDIA_TYPES[path.suffix],
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )
