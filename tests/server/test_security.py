"""API key on every protected route, Host checks, body size limit, CORS, bounds, error shapes."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL_ID, LiveServer, build_stories, live_server
from torchchat.server.config import ServerOptions
from torchchat.server.run import warn_if_exposed
from torchchat.server.security import allowed_host_names, host_name

LIMITS = dict(max_body_bytes=64 * 1024, max_prompt_chars=2000, max_n=4, max_tokens_limit=32)
HI = [{"role": "user", "content": "Hi"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def srv():
    with live_server(ServerOptions(model_id=MODEL_ID, api_key=API_KEY, **LIMITS)) as s:
        yield s


def protected_routes(srv) -> list[tuple[str, str]]:
    """Every route the app has, minus the public ones, plus paths that match no route."""
    routes = []
    for route in srv.app.routes:
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                routes.append((method, route.path.replace("{model_id:path}", MODEL_ID)))
    public = {"/health", "/", "/static"}
    routes = [(m, p) for m, p in routes if p not in public]
    return [*routes, ("GET", "/v1/nope"), ("POST", "/v1/embeddings"), ("GET", "/openapi.json")]


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and body["error"]["code"]  # every error has a code
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def test_every_protected_route_needs_the_key(srv):
    routes = protected_routes(srv)
    paths = {p for _, p in routes}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics"} <= paths
    bad_headers = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}]
    bad_headers += [{"Authorization": f"Basic {API_KEY}"}, {"Authorization": f"Bearer {API_KEY}x"}]
    with srv.http() as http:
        for method, path in routes:
            for headers in bad_headers:
                r = http.request(method, path, headers=headers, json={})
                assert_error(r, 401, "invalid_api_key")
                assert r.headers["www-authenticate"] == "Bearer"
            r = http.request(method, path, headers=AUTH, json={})
            assert r.status_code != 401, (method, path)


def test_public_routes_need_no_key(srv):
    with srv.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert http.get("/static/app.js").status_code == 200


def test_openai_client_with_and_without_key(srv):
    with pytest.raises(openai.AuthenticationError):
        srv.client(api_key="sk-wrong").models.list()
    r = srv.client().chat.completions.create(model=MODEL_ID, messages=HI, max_tokens=3)
    assert r.usage.completion_tokens == 3


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil", ""]
)
def test_bad_host_header_is_400(srv, host):
    with srv.http() as http:
        for path in ("/health", "/v1/models"):
            r = http.get(path, headers={"Host": host, **AUTH})
            assert_error(r, 400, "invalid_host")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "LOCALHOST"])
def test_local_host_headers_accepted(srv, host):
    with srv.http() as http:
        r = http.get("/health", headers={"Host": f"{host}:{srv.port}"})
        assert r.status_code == 200


def test_allowed_host_names():
    assert host_name("[::1]:8000") == "::1" and host_name("Example.com:80") == "example.com"
    assert "localhost" in allowed_host_names(ServerOptions())
    assert allowed_host_names(ServerOptions(host="0.0.0.0")) is None  # any: the key guards
    names = allowed_host_names(ServerOptions(host="0.0.0.0", allowed_hosts=("box.lan",)))
    assert "box.lan" in names and "evil.example" not in names
    assert allowed_host_names(ServerOptions(allowed_hosts=("*",))) is None


def test_oversize_body_is_413(srv):
    big = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x" * 70_000}]}
    with srv.http() as http:
        assert_error(http.post("/v1/chat/completions", json=big, headers=AUTH), 413)
        # Without the key the body is not even read.
        assert_error(http.post("/v1/chat/completions", json=big), 401)

        def chunks():  # no Content-Length: the limit is enforced on the bytes received
            yield b'{"prompt": "'
            for _ in range(80):
                yield b"x" * 1024
            yield b'"}'

        r = http.post("/v1/completions", content=chunks(), headers=AUTH)
        assert "content-length" not in r.request.headers
        assert_error(r, 413)
        # Under the limit, the same request goes through to validation.
        ok = {"prompt": "Once upon a time " * 50, "max_tokens": 1}
        assert http.post("/v1/completions", json=ok, headers=AUTH).status_code == 200


CHAT_BAD = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.1}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2**31 + 1}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 33}, "max_tokens"),  # above --max-tokens-limit
    ({"max_tokens": 2**21}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": 33}, "max_completion_tokens"),
    ({"n": 0}, "n"),
    ({"n": 5}, "n"),  # above --max-n
    ({"n": 17}, "n"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * 257}, "stop"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ({"messages": []}, "messages"),
    ({"messages": HI * 1025}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, None),
    ({"messages": [{"role": "user", "content": "x" * 2001}]}, "messages"),  # --max-prompt-chars
    ({"messages": [{"role": "user", "content": 5}]}, None),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),  # template refuses
    ({"user": "u" * 257}, "user"),
    ({"model": "m" * 257}, "model"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
]


@pytest.mark.parametrize("patch, param", CHAT_BAD, ids=[str(p)[:60] for p, _ in CHAT_BAD])
def test_chat_bounds_are_400(srv, patch, param):
    body = {"model": MODEL_ID, "messages": HI, "max_tokens": 4, **patch}
    with srv.http() as http:
        error = assert_error(http.post("/v1/chat/completions", json=body, headers=AUTH), 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


COMPLETION_BAD = [
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 600]}, "prompt"),  # outside the 512-token vocabulary
    ({"prompt": [-1]}, None),
    ({"prompt": ["a"] * 17}, None),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": ["a", "b", "c"], "n": 2}, "n"),  # 6 choices > --max-n 4
    ({"logprobs": 6}, "logprobs"),
    ({"echo": "yes"}, "echo"),
    ({"max_tokens": 33}, "max_tokens"),
    ({"prompt": None}, None),
]


@pytest.mark.parametrize(
    "patch, param", COMPLETION_BAD, ids=[str(p)[:60] for p, _ in COMPLETION_BAD]
)
def test_completion_bounds_are_400(srv, patch, param):
    body = {"model": MODEL_ID, "prompt": "Once", "max_tokens": 4, **patch}
    with srv.http() as http:
        error = assert_error(http.post("/v1/completions", json=body, headers=AUTH), 400)
    if param is not None:
        assert error["param"] == param


def test_malformed_bodies_are_400_not_422(srv):
    with srv.http() as http:
        for content in (b"{not json", b"[1, 2]", b'"text"', b"", b'{"temperature": NaN}'):
            r = http.post(
                "/v1/chat/completions",
                content=content,
                headers={**AUTH, "Content-Type": "application/json"},
            )
            assert_error(r, 400)
        r = http.post("/v1/chat/completions", json={"model": MODEL_ID}, headers=AUTH)
        assert assert_error(r, 400)["param"] == "messages"


def test_not_found_and_method_errors(srv):
    with srv.http() as http:
        r = http.post(
            "/v1/chat/completions", json={"model": "gpt-4o", "messages": HI}, headers=AUTH
        )
        assert assert_error(r, 404, "model_not_found")["param"] == "model"
        assert_error(http.get("/v1/models/gpt-4o", headers=AUTH), 404, "model_not_found")
        assert_error(http.get("/v1/nope", headers=AUTH), 404)
        assert_error(http.get("/v1/chat/completions", headers=AUTH), 405)


def test_cors_localhost_only_by_default(srv):
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    with srv.http() as http:
        ok = http.options(
            "/v1/chat/completions", headers={"Origin": "http://localhost:3000", **preflight}
        )
        assert ok.headers["access-control-allow-origin"] == "http://localhost:3000"
        bad = http.options(
            "/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight}
        )
        assert "access-control-allow-origin" not in bad.headers
        r = http.get("/v1/models", headers={"Origin": "https://evil.example", **AUTH})
        assert "access-control-allow-origin" not in r.headers


def test_cors_origins_option():
    opts = ServerOptions(model_id=MODEL_ID, cors_origins=("https://app.example",))
    with live_server(opts) as s, s.http() as http:
        r = http.get("/v1/models", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = http.get("/v1/models", headers={"Origin": "http://localhost:3000"})
        assert "access-control-allow-origin" not in r.headers


def test_warns_loudly_when_exposed_without_key(capsys):
    warn_if_exposed(ServerOptions(host="0.0.0.0"))
    assert "WARNING" in capsys.readouterr().err
    warn_if_exposed(ServerOptions(host="0.0.0.0", api_key="k"))
    warn_if_exposed(ServerOptions(host="127.0.0.1"))
    assert capsys.readouterr().err == ""


def test_health_503_while_loading():
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return build_stories()

    s = LiveServer(ServerOptions(model_id=MODEL_ID), slow_load).start(wait_loaded=False)
    try:
        with s.http() as http:
            r = http.get("/health")
            assert r.status_code == 503 and r.json() == {"status": "loading"}
            assert_error(http.get("/v1/models"), 503, "model_loading")
            body = {"messages": HI, "max_tokens": 2}
            assert_error(http.post("/v1/chat/completions", json=body), 503, "model_loading")
            release.set()
            assert s.host.loaded.wait(30)
            assert http.get("/health").status_code == 200
            assert http.post("/v1/chat/completions", json=body).status_code == 200
    finally:
        release.set()
        s.stop()
