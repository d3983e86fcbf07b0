"""Byte-exact SSE framing, UTF-8 held back across tokens, stop strings split across tokens.

A scripted runtime makes the 'model' emit a known token sequence:
" Once", " upon", " a", " time", <0xC3>, <0xA9>, " there", " was", EOS
so "é" is split over two byte tokens and stop strings can straddle any boundary.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.server.conftest import MODEL_ID, ScriptedRuntime, build_stories, live_server
from torchchat.server.config import ServerOptions

SCRIPT = [403, 407, 261, 378, 198, 172, 383, 286, 2]
TEXT = " Once upon a timeé there was"  # what SCRIPT decodes to after a prompt token


def scripted():
    built = build_stories()
    built.runtime = ScriptedRuntime(built.runtime, SCRIPT)
    return built


@pytest.fixture(scope="module")
def srv():
    with live_server(ServerOptions(model_id=MODEL_ID), load=scripted) as s:
        yield s


def raw_stream(srv, path: str, body: dict) -> tuple[bytes, dict]:
    with srv.http() as http, http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        return b"".join(r.iter_raw()), dict(r.headers)


def frames(raw: bytes) -> list[bytes]:
    """Split an SSE body into its frames, asserting each is exactly `data: ...\\n\\n`."""
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b"\r" not in raw
    parts = raw.split(b"\n\n")
    assert parts[-1] == b""
    for part in parts[:-1]:
        assert part.startswith(b"data: ") and b"\n" not in part, part
    return [p[len(b"data: ") :] for p in parts[:-1]]


def test_chat_stream_bytes_exact(srv):
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    raw, headers = raw_stream(srv, "/v1/chat/completions", body)
    assert headers["content-type"].startswith("text/event-stream")
    first = json.loads(frames(raw)[0])
    rid, created = first["id"], first["created"]
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", rid)
    head = (
        f'{{"id":"{rid}","object":"chat.completion.chunk","created":{created},'
        f'"model":"{MODEL_ID}","system_fingerprint":"fp_torchchat",'
    )

    def chunk(delta: str, finish: str = "null") -> bytes:
        return (
            f'data: {head}"choices":[{{"index":0,"delta":{delta},"logprobs":null,'
            f'"finish_reason":{finish}}}],"usage":null}}\n\n'
        ).encode()

    pieces = [" Once", " upon", " a", " time", "é", " there", " was"]
    prompt_tokens = first_prompt_tokens(srv, body)
    usage = (
        f'{{"prompt_tokens":{prompt_tokens},"completion_tokens":8,"total_tokens":{prompt_tokens + 8},'
        f'"prompt_tokens_details":{{"cached_tokens":0}}}}'
    )
    expected = (
        chunk('{"role":"assistant","content":""}')
        + b"".join(
            chunk(json.dumps({"content": p}, separators=(",", ":"), ensure_ascii=False))
            for p in pieces
        )
        + chunk("{}", '"stop"')
        + f'data: {head}"choices":[],"usage":{usage}}}\n\n'.encode()
        + b"data: [DONE]\n\n"
    )
    assert raw == expected


def first_prompt_tokens(srv, body: dict) -> int:
    """Prompt tokens of the chat request, from a non-streamed run (cached prefix forgotten by
    generating with a different prompt first)."""
    with srv.http() as http:
        http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        return http.post("/v1/chat/completions", json=plain).json()["usage"]["prompt_tokens"]


def test_completion_stream_framing_is_compact_json(srv):
    raw, _ = raw_stream(
        srv, "/v1/completions", {"prompt": "Hi", "stream": True, "logprobs": 1, "n": 2}
    )
    payloads = frames(raw)
    assert payloads[-1] == b"[DONE]"
    ids = set()
    for p in payloads[:-1]:
        obj = json.loads(p)
        assert json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() == p
        ids.add((obj["id"], obj["created"]))
    assert len(ids) == 1  # one id and one `created` per request
    texts = {0: "", 1: ""}
    for p in payloads[:-1]:
        choice = json.loads(p)["choices"][0]
        texts[choice["index"]] += choice["text"]
        assert "\ufffd" not in choice["text"]  # never half a UTF-8 character
    assert texts == {0: TEXT, 1: TEXT}


def test_utf8_character_split_over_tokens_arrives_whole(srv):
    raw, _ = raw_stream(srv, "/v1/completions", {"prompt": "Hi", "stream": True})
    pieces = [json.loads(p)["choices"][0]["text"] for p in frames(raw)[:-1]]
    assert "é" in pieces and "".join(pieces) == TEXT


@pytest.mark.parametrize(
    "stop, kept",
    [
        ("meé th", " Once upon a ti"),  # spans " time", both halves of "é" and " there"
        ("é", " Once upon a time"),  # a stop made of two byte tokens
        ("on a", " Once up"),  # ends inside " a"
        (" was", " Once upon a timeé there"),  # the last token
        ("nowhere", TEXT),  # never matches: EOS ends it
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_tokens(srv, stop, kept, stream):
    body = {"prompt": "Hi", "stop": [stop], "stream": stream, "max_tokens": 20}
    with srv.http() as http:
        if stream:
            raw, _ = raw_stream(srv, "/v1/completions", body)
            choices = [json.loads(p)["choices"][0] for p in frames(raw)[:-1]]
        else:
            choices = http.post("/v1/completions", json=body).json()["choices"]
    assert "".join(c["text"] for c in choices) == kept
    assert choices[-1]["finish_reason"] == "stop"
    assert all(stop not in c["text"] for c in choices)


def test_length_finish(srv):
    with srv.http() as http:
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).json()
    assert r["choices"][0] == {
        "index": 0,
        "text": " Once upon a",
        "logprobs": None,
        "finish_reason": "length",
    }
    assert r["usage"]["completion_tokens"] == 3
