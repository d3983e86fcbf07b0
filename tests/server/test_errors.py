"""Errors that tell the truth: exact status, type and code for each, and limits named as in force."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import MODEL_ID, live_server
from torchchat.server.config import ServerOptions

LIMITS = dict(max_tokens_limit=32, max_n=3, max_prompt_chars=100)
HI = [{"role": "user", "content": "Hi"}]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def http():
    with live_server(ServerOptions(model_id=MODEL_ID, **LIMITS)) as srv, srv.http() as client:
        yield client


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_nan_and_infinity_are_invalid_json(http, route, constant):
    fields = (
        '"prompt": "Hi"'
        if route == "/v1/completions"
        else '"messages": [{"role": "user", "content": "Hi"}]'
    )
    body = '{%s, "max_tokens": 2, "temperature": %s}'
    assert http.post(route, content=body % (fields, "0.5"), headers=JSON).status_code == 200
    error = error_of(http.post(route, content=body % (fields, constant), headers=JSON), 400)
    assert error == {
        "message": f"request body is not valid JSON: {constant} is not a JSON value",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_json",
    }


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b"{not json",
            "request body is not valid JSON: Expecting property name enclosed in double quotes",
        ),
        (b'{"prompt": "Hi\xff"}', "There was an error parsing the body"),  # not UTF-8
        (b"[1, 2]", "request body must be a JSON object, sent with Content-Type: application/json"),
    ],
)
def test_body_parse_errors_have_a_code(http, content, message):
    error = error_of(http.post("/v1/completions", content=content, headers=JSON), 400)
    assert error == {
        "message": message,
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_json",
    }


def test_path_and_method_errors_have_a_code(http):
    assert error_of(http.get("/v1/nope"), 404) == {
        "message": "Not found",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }
    assert error_of(http.get("/v1/completions"), 405)["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    "route, patch, param, message",
    [
        ("/v1/completions", {"max_tokens": 2**21}, "max_tokens", "max_tokens is 2097152, above this server's limit of 32"),
        ("/v1/completions", {"max_tokens": 33}, "max_tokens", "max_tokens is 33, above this server's limit of 32"),
        ("/v1/chat/completions", {"max_completion_tokens": 2**40}, "max_completion_tokens", f"max_completion_tokens is {2**40}, above this server's limit of 32"),
        ("/v1/completions", {"n": 17}, "n", "17 choices requested; this server allows at most 3"),
        ("/v1/chat/completions", {"n": 4}, "n", "4 choices requested; this server allows at most 3"),
        ("/v1/completions", {"prompt": "x" * 2_000_000}, "prompt", "prompt holds 2000000 characters; this server accepts at most 100"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 1_500_000}]}, "messages", "messages hold 1500000 characters; this server accepts at most 100"),
    ],
)  # fmt: skip
def test_limit_messages_name_the_limit_in_force(http, route, patch, param, message):
    body = {"prompt": "Hi"} if route == "/v1/completions" else {"messages": HI}
    body = {**body, **patch}
    # The server's limits are tighter than the schema's static bounds (1 << 20 tokens, 16
    # choices, 1,000,000 characters of one string): the message names the server's own.
    opts = ServerOptions(model_id=MODEL_ID, **LIMITS, max_body_bytes=4 * 1024 * 1024)
    with live_server(opts) as srv, srv.http() as client:
        error = error_of(client.post(route, json=body), 400)
    code = "context_length_exceeded" if param in ("prompt", "messages") else "invalid_value"
    assert error == {
        "message": message,
        "type": "invalid_request_error",
        "param": param,
        "code": code,
    }


def test_top_p_zero_is_greedy(http):
    def text(**sampling) -> str:
        body = {"prompt": "Once upon a time", "max_tokens": 12, "seed": 5, **sampling}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    greedy = text(temperature=0)
    assert text(temperature=1.0, top_p=0) == greedy
    chat = {"messages": HI, "max_tokens": 8, "temperature": 1.5, "top_p": 0}
    greedy_chat = {**chat, "temperature": 0, "top_p": 1}
    r, g = (
        http.post("/v1/chat/completions", json=chat),
        http.post("/v1/chat/completions", json=greedy_chat),
    )
    assert (
        r.status_code == 200
        and r.json()["choices"][0]["message"] == g.json()["choices"][0]["message"]
    )


def test_echoed_token_prompt_keeps_its_text(http):
    # [BOS, " Once", " upon"]: the text these tokens spell starts with a space.
    body = {"prompt": [1, 403, 407], "echo": True, "max_tokens": 3, "temperature": 0}
    echoed = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    plain = http.post("/v1/completions", json={**body, "echo": False}).json()["choices"][0]["text"]
    assert echoed == " Once upon" + plain
    batch = {**body, "prompt": [[1, 403, 407], [403]], "max_tokens": 0}
    texts = [c["text"] for c in http.post("/v1/completions", json=batch).json()["choices"]]
    assert texts == [" Once upon", " Once"]
