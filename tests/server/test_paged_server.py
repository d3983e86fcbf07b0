"""The paged engine through HTTP: chats sharing a system prompt prefill it once and report it
in `cached_tokens`; one stream gives what `--max-batch 1` gives."""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.conftest import MODEL_ID, live_server
from torchchat.server.config import ServerOptions

SYSTEM = " ".join(["You are a storyteller who tells short stories about cats and dogs."] * 6)


def metrics(srv) -> dict[str, float]:
    with srv.http() as http:
        text = http.get("/metrics").text
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if line[0] != "#")}


def test_concurrent_chats_with_one_system_prompt_prefill_it_once():
    opts = ServerOptions(model_id=MODEL_ID, max_batch=4, max_tokens_limit=64)
    questions = ["Tell me about a cat.", "And a dog?", "A bird, please.", "Now a fish."]
    with live_server(opts) as srv:
        client = srv.client()

        def chat(question: str):
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": question},
            ]
            return client.chat.completions.create(
                model=MODEL_ID, messages=messages, max_tokens=8, temperature=0
            )

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(chat, questions))
        m = metrics(srv)
    usage = [r.usage for r in replies]
    cached = sorted(u.prompt_tokens_details.cached_tokens for u in usage)
    # One of them computed the system prompt; the others shared its full 16-token blocks, and
    # copied the positions of the block where it ends that are the same in theirs (so they
    # differ by the tokens their own messages happen to share).
    assert cached[0] == 0 and cached[1] >= 16 * 4 and cached[3] - cached[1] < 16
    prompt_tokens = sum(u.prompt_tokens for u in usage)
    assert m["torchchat_cached_tokens_total"] == sum(cached)
    assert m["torchchat_prefill_tokens_total"] == prompt_tokens - sum(cached)
    assert m["torchchat_kv_cache_bytes"] > 0


@pytest.mark.parametrize("prompt", ["Once upon a time", "The little dog ran to the park and"])
def test_one_stream_equals_max_batch_1(prompt):
    body = {"prompt": prompt, "max_tokens": 60, "temperature": 0, "logprobs": 2}
    got = {}
    for max_batch in (8, 1):
        opts = ServerOptions(model_id=MODEL_ID, max_batch=max_batch, max_tokens_limit=64)
        with live_server(opts) as srv, srv.http() as http:
            assert srv.engine.batched == (max_batch > 1)
            got[max_batch] = http.post("/v1/completions", json=body).json()["choices"][0]
    paged, single = got[8], got[1]
    assert paged["text"] == single["text"]
    assert paged["logprobs"]["tokens"] == single["logprobs"]["tokens"]
    lp, ls = paged["logprobs"]["token_logprobs"], single["logprobs"]["token_logprobs"]
    assert lp == pytest.approx(ls, abs=1e-4)


def test_completion_requests_count_as_arriving_until_queued():
    """Each completion request counts with the engine from its first bytes until its job is
    queued (an idle engine waits for a burst's requests), or until it is answered otherwise."""
    with live_server(ServerOptions(model_id=MODEL_ID, max_tokens_limit=64)) as srv:
        engine, seen = srv.engine, []
        counted = engine.arrival

        def arrival():
            seen.append(counted())
            return seen[-1]

        engine.arrival = arrival
        with srv.http() as http:
            ok = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            chat = http.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            )
            broken = http.post(
                "/v1/completions", content=b"{", headers={"Content-Type": "application/json"}
            )
            invalid = http.post("/v1/chat/completions", json={"messages": "no"})
            too_long = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 10**6})
            http.get("/v1/models")
            body = {"prompt": "Once upon a time", "max_tokens": 60, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as streamed:
                lines = streamed.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                assert engine.arriving == 0  # queued: no longer arriving while it streams
                assert list(lines)[-2] == "data: [DONE]"
    statuses = [r.status_code for r in (ok, chat, broken, invalid, too_long)]
    assert statuses == [200, 200, 400, 400, 400]
    assert len(seen) == 6 and engine.arriving == 0


def test_the_loaded_model_is_out_of_the_garbage_collectors_sight():
    """Once the model is loaded its objects are frozen (gc.freeze): a full collection, which
    took 121 ms in the middle of a burst of chats, no longer scans them."""
    gc.unfreeze()
    with live_server(ServerOptions(model_id=MODEL_ID)) as srv:
        assert srv.engine is not None
        frozen = gc.get_freeze_count()
    assert frozen > 10_000  # torch, the libraries and the model: far more than a few
