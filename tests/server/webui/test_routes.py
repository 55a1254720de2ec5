"""The chat page's files over real HTTP: types, caching, CSP, HEAD, 304 and the API key."""

from __future__ import annotations

import re

import httpx
import pytest

from server.api.handlers import APIState, build_router
from server.http.routing import Router
from server.webui.routes import ASSETS, FILES, add_webui_routes
from tests.server.helpers import ServerThread, fast_config


@pytest.fixture(scope="module")
def base_url():
    router = add_webui_routes(build_router(APIState(["m"]), Router()))
    with ServerThread(router, fast_config(api_key="sk-page")) as srv:
        yield f"http://127.0.0.1:{srv.port}"


@pytest.mark.parametrize("path", list(ASSETS))
def test_each_file_has_its_type_csp_and_etag_without_the_key(base_url: str, path: str) -> None:
    r = httpx.get(base_url + path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == ASSETS[path][1]
    assert r.content == FILES[path].body
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-cache"
    again = httpx.get(base_url + path, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    head = httpx.head(base_url + path)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(r.content)


def test_the_api_still_needs_the_key(base_url: str) -> None:
    r = httpx.get(base_url + "/v1/models")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_the_page_names_only_files_that_are_served() -> None:
    html = FILES["/"].body.decode()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    local = [ref for ref in refs if not ref.startswith("data:")]
    assert local and all("/" + ref in ASSETS for ref in local), refs
    assert "http://" not in html and "https://" not in html  # nothing from the network


def test_no_script_builds_html_from_text() -> None:
    for path in ("/webui/app.js", "/webui/markdown.js"):
        source = FILES[path].body.decode()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in source, (path, sink)


def test_without_the_page_slash_is_a_404() -> None:
    router = build_router(APIState(["m"]), Router())
    with ServerThread(router) as srv:
        assert httpx.get(f"http://127.0.0.1:{srv.port}/").status_code == 404
