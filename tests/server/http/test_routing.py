"""Router: static and parameterised paths, 404, 405 with Allow, HEAD for GET."""

from __future__ import annotations

import pytest

from server.http.errors import HTTPError
from server.http.routing import Router


async def h_list(request):
    return "list"


async def h_get(request):
    return "get"


async def h_post(request):
    return "post"


async def h_head(request):
    return "head"


@pytest.fixture
def router() -> Router:
    r = Router()
    r.add("GET", "/v1/models", h_list)
    r.add("POST", "/v1/models", h_post)
    r.add("GET", "/v1/models/{model:path}", h_get)
    r.add("get", "/items/{item_id}/parts/{part}", h_get)
    return r


def test_static_route(router):
    assert router.match("GET", "/v1/models") == (h_list, {})
    assert router.match("POST", "/v1/models") == (h_post, {})


def test_path_params_are_decoded(router):
    handler, params = router.match("GET", "/items/a%2Fb/parts/7")
    assert handler is h_get
    assert params == {"item_id": "a/b", "part": "7"}


def test_path_converter_takes_slashes(router):
    assert router.match("GET", "/v1/models/org/name-1.5B") == (h_get, {"model": "org/name-1.5B"})


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/models/", "/items/x/parts", "/items//parts/1"])
def test_unknown_path_is_404(router, path):
    with pytest.raises(HTTPError) as info:
        router.match("GET", path)
    assert info.value.status == 404


def test_wrong_method_is_405_with_allow(router):
    with pytest.raises(HTTPError) as info:
        router.match("DELETE", "/v1/models")
    assert info.value.status == 405
    assert info.value.headers == [("allow", "GET, HEAD, POST")]
    with pytest.raises(HTTPError) as info:
        router.match("POST", "/v1/models/x")
    assert info.value.headers == [("allow", "GET, HEAD")]


def test_head_uses_get_unless_registered(router):
    assert router.match("HEAD", "/v1/models")[0] is h_list
    router.add("HEAD", "/v1/models", h_head)
    assert router.match("HEAD", "/v1/models")[0] is h_head


def test_first_matching_pattern_wins():
    r = Router()
    r.add("GET", "/a/{x}", h_get)
    r.add("GET", "/a/{y:path}", h_list)
    assert r.match("GET", "/a/b") == (h_get, {"x": "b"})
    assert r.match("GET", "/a/b/c") == (h_list, {"y": "b/c"})


def test_decorators():
    r = Router()

    @r.get("/x")
    async def x(request):
        return None

    @r.post("/x")
    async def y(request):
        return None

    assert r.match("GET", "/x")[0] is x
    assert r.match("POST", "/x")[0] is y


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/models"), ("GET", "/v1/models/{model:path}")]
)
def test_duplicate_route_is_refused(router, method, path):
    with pytest.raises(ValueError, match="already registered"):
        router.add(method, path, h_get)


@pytest.mark.parametrize(("method", "path"), [("G ET", "/x"), ("GET", "x"), ("", "/x")])
def test_bad_route_definitions(method, path):
    with pytest.raises(ValueError):
        Router().add(method, path, h_get)


def test_error_format_applies_to_its_paths_only():
    r = Router()
    r.add_error_format("/v1/messages/", lambda exc: HTTPError(exc.status, f"formatted: {exc}"))
    error = HTTPError(404, "gone")
    for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/messages/a/b"):
        assert r.error_for(path, error).message == "formatted: gone"
    for path in ("/v1/messagesx", "/v1/models", "/"):
        assert r.error_for(path, error) is error
    with pytest.raises(ValueError):
        r.add_error_format("v1", lambda exc: exc)


def test_public_paths():
    router = Router()
    router.add("GET", "/health", h_get, public=True)
    router.add("GET", "/v1/models", h_list)
    assert router.is_public("/health")
    assert not router.is_public("/v1/models") and not router.is_public("/nope")
    with pytest.raises(ValueError, match="only fixed paths"):
        router.add("GET", "/v1/models/{model}", h_get, public=True)
