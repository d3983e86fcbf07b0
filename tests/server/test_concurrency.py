"""One engine, a bounded queue: concurrent requests never mix, a full queue answers 503, and a
client that leaves stops its generation within one decode step."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.conftest import MODEL_ID, SlowRuntime, build_stories, live_server
from tests.support import wait_for
from torchchat.server.config import ServerOptions

ANIMALS = ["cat", "dog", "bird", "fish", "frog", "bear", "lion", "duck"]
PROMPTS = [f"Tell me a {w} story about a {a}." for w in ("short", "happy") for a in ANIMALS]
DELAY = 0.05  # seconds added to each decode step of the slow server


def stream_text(client, prompt: str) -> str:
    chunks = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=48,
        temperature=0,
        stream=True,
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_16_concurrent_streams_equal_alone(server):
    assert len(set(PROMPTS)) == 16
    alone = [stream_text(server.client(), p) for p in PROMPTS]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: stream_text(server.client(), p), PROMPTS))
    assert together == alone
    assert len(set(alone)) > 8  # the prompts really lead to different stories


@pytest.fixture(scope="module")
def slow():
    """A server whose decode steps take DELAY longer, with room for one waiting request."""
    holder = {}

    def load():
        built = build_stories()
        built.runtime = holder["runtime"] = SlowRuntime(built.runtime, DELAY)
        return built

    with live_server(ServerOptions(model_id=MODEL_ID, max_queue=1), load=load) as srv:
        srv.runtime = holder["runtime"]
        yield srv


def open_stream(http: httpx.Client, max_tokens: int = 400) -> httpx.Response:
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True}
    request = http.build_request("POST", "/v1/completions", json=body)
    return http.send(request, stream=True)


def test_disconnect_stops_generation_within_one_step(slow):
    engine, runtime = slow.engine, slow.runtime
    cancelled = engine.stats.cancelled
    with slow.http() as http:
        r = open_stream(http)
        lines = r.iter_lines()
        for _ in range(3):  # generation is under way
            assert next(lines).startswith("data: {")
            next(lines)
        r.close()
    at_close = runtime.decodes
    wait_for(lambda: engine.stats.cancelled == cancelled + 1)
    time.sleep(10 * DELAY)  # ten more steps' worth of time: none of them may run
    # At most the step that was already running when the client left, and the one whose
    # logits were being computed as the server noticed.
    assert runtime.decodes - at_close <= 2
    assert not engine.running


def test_non_streamed_disconnect_also_stops(slow):
    engine, runtime = slow.engine, slow.runtime
    cancelled = engine.stats.cancelled
    body = {"prompt": "Once upon a time", "max_tokens": 400}
    with slow.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=5 * DELAY)
    at_close = runtime.decodes
    wait_for(lambda: engine.stats.cancelled == cancelled + 1)
    time.sleep(10 * DELAY)
    assert runtime.decodes - at_close <= 2


def test_full_queue_is_503_and_waiting_requests_are_served_in_order(slow):
    engine = slow.engine
    with slow.http() as a, slow.http() as b, slow.http() as c:
        first = open_stream(a, max_tokens=30)
        wait_for(lambda: engine.running)
        second = open_stream(b, max_tokens=5)  # waits: the queue (size 1) is now full
        wait_for(lambda: engine.waiting == 1)
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "server_busy"
        t_first = _read_to_done(first)
        t_second = _read_to_done(second)
        assert t_first < t_second  # arrival order
        assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_request_cancelled_while_waiting_never_runs(slow):
    engine = slow.engine
    served, cancelled = engine.stats.requests, engine.stats.cancelled
    with slow.http() as a, slow.http() as b:
        first = open_stream(a, max_tokens=40)
        wait_for(lambda: engine.running)
        second = open_stream(b, max_tokens=40)
        wait_for(lambda: engine.waiting == 1)
        second.close()
        _read_to_done(first)
    wait_for(lambda: engine.stats.cancelled == cancelled + 1)
    assert engine.stats.requests == served + 1


def _read_to_done(response: httpx.Response) -> float:
    """Read an SSE response to its end; the time its [DONE] arrived."""
    payloads = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "length"
    response.close()
    return time.monotonic()
