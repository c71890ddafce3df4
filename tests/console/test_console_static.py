"""The console's page and files as the API serves them: no key needed, a strict CSP on every
response, no inline script or style in the page, nothing that writes HTML from strings."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.console.router import CSP, STATIC_DIR, STATIC_FILES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The whole app, embedded settings (the console routes touch no database)."""
    from tests.service.conftest import clear_caches

    env = {
        "SARFT_HOME": str(tmp_path_factory.mktemp("home")),
        "SARFT_DATABASE_URL": "",
        "SARFT_REDIS_URL": "",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        clear_caches()
        from service.app import create_app

        yield TestClient(create_app())
    clear_caches()  # the settings of the restored environment


def csp_directives(header: str) -> dict[str, list[str]]:
    parts = [p.split() for p in header.split(";") if p.strip()]
    return {p[0]: p[1:] for p in parts}


def test_csp_allows_only_own_scripts_and_styles() -> None:
    directives = csp_directives(CSP)
    assert directives["default-src"] == ["'none'"]
    assert directives["script-src"] == ["'self'"] and directives["style-src"] == ["'self'"]
    assert directives["connect-src"] == ["'self'"] and directives["frame-ancestors"] == ["'none'"]
    assert directives["form-action"] == ["'none'"] and directives["base-uri"] == ["'none'"]
    assert "unsafe-inline" not in CSP and "unsafe-eval" not in CSP


@pytest.mark.parametrize("path", ["/console", "/console/"])
def test_index_is_served_without_a_key_with_the_security_headers(
    client: TestClient, path: str
) -> None:
    r = client.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["content-security-policy"] == CSP
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["cache-control"] == "no-store"
    assert '<script type="module" src="/console/static/app.js"></script>' in r.text


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_bodies: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_bodies.append(data)


def test_index_has_no_inline_script_handler_or_style() -> None:
    page = PageParser()
    page.feed((STATIC_DIR / "index.html").read_text(encoding="utf-8"))
    assert not [b for b in page.script_bodies if b.strip()], "inline script"
    for tag, attrs in page.tags:
        assert tag != "style", "inline <style>"
        assert "style" not in attrs, f"style attribute on <{tag}>"
        assert not [a for a in attrs if a.startswith("on")], f"event handler on <{tag}>"
        if tag == "script":
            assert (attrs.get("src") or "").startswith("/console/static/")
    referenced = [
        str(attrs.get("src") or attrs.get("href"))
        for tag, attrs in page.tags
        if tag in ("script", "link")
    ]
    for url in referenced:
        assert url.removeprefix("/console/static/") in STATIC_FILES, url


def test_every_static_file_is_served_with_its_type_and_the_csp(client: TestClient) -> None:
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    assert {"app.js", "api.js", "console.css", "favicon.svg"} <= set(STATIC_FILES)
    for name in STATIC_FILES:
        r = client.get(f"/console/static/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"].split(";")[0] == types[Path(name).suffix], name
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.content == (STATIC_DIR / name).read_bytes()


@pytest.mark.parametrize(
    "name", ["nope.js", "index.html", "..%2Frouter.py", "%2E%2E%2F__init__.py", "router.py"]
)
def test_only_the_listed_files_are_served(client: TestClient, name: str) -> None:
    r = client.get(f"/console/static/{name}")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_console_routes_stay_out_of_the_openapi_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/console")]


def js_sources() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(STATIC_DIR.glob("*.js"))}


def test_scripts_build_the_dom_from_text_never_from_html() -> None:
    # The patterns that would turn a user's string into markup, code or an inline style.
    forbidden = re.compile(
        r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|"
        r"\.style\.|setAttribute\(\s*[\"']style|[\"']style[\"']\s*:"
    )
    for name, source in js_sources().items():
        assert not forbidden.findall(source), (name, forbidden.findall(source))


def test_the_key_is_handled_in_one_module_and_only_in_session_storage() -> None:
    for name, source in js_sources().items():
        assert "localStorage" not in source and "document.cookie" not in source, name
        if name != "api.js":
            assert "sessionStorage" not in source and "Authorization" not in source, name


def test_module_imports_resolve_to_served_files() -> None:
    for name, source in js_sources().items():
        for target in re.findall(r'from "\./([^"]+)"', source):
            assert target in STATIC_FILES, (name, target)


def test_the_package_ships_the_static_files() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["service"]
    assert "console/static/*" in patterns
    assert not [p for p in STATIC_DIR.iterdir() if p.is_dir()], "the glob does not recurse"
